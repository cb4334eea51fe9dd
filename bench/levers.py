"""Measures the speed levers one by one on the full-size SDXL UNets, VAE and trainer step.

Where `bench/benchmark.py` times the worker's code end to end against plain diffusers,
this script isolates each lever the engine could pull (memory format, attention backend,
regional or whole-model compilation, CUDA graphs, VAE precision, LoRA factor precision)
so that only those that pay are kept. Each variant records its step time and, where it
compiles, the compile time it adds to a worker's start.

    python -m bench.levers --parts gen --out results/      # one GPU
    python -m bench.levers --parts train --out results/    # another, at the same time

Writes `levers-<part>.json` under --out after every variant, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from bench import benchmark  # same model source, inputs and timing as the benchmark
from bench.benchmark import DEVICE, latent_inputs, model_source, peak_gib, sync_time
from bench.common import environment, random_lora
from sdxl_engine.generation import AppliedLora, load_pipelines
from sdxl_engine.training.adapters import LORA_TARGET_MODULES


def timed_calls(function, warmup: int, runs: int) -> tuple[float, float]:
    """(seconds of the first call, median milliseconds of the `runs` calls after warm-up)."""
    start = sync_time()
    function()
    first_s = sync_time() - start
    for _ in range(warmup - 1):
        function()
    times = []
    for _ in range(runs):
        start = sync_time()
        function()
        times.append(sync_time() - start)
    times.sort()
    return round(first_s, 2), round(times[len(times) // 2] * 1000, 2)


class Recorder:
    def __init__(self, path: Path, header: dict):
        self.path, self.results = path, dict(header)

    def variant(self, name: str, function) -> None:
        """Runs one measurement; a failing variant records its error and the rest go on."""
        try:
            self.results[name] = function()
        except Exception:  # noqa: BLE001 - a lever that breaks is a result too
            self.results[name] = {"error": traceback.format_exc()[-1500:]}
        print(name, json.dumps(self.results[name])[:400], flush=True)
        self.path.write_text(json.dumps(self.results, indent=2))


def uncompile(module: torch.nn.Module) -> None:
    """Undo `module.compile()` and every compiled region under it."""
    for sub in module.modules():
        sub._compiled_call_impl = None
    torch._dynamo.reset()


def part_gen(args, recorder: Recorder) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipelines = load_pipelines(model_source(args))
    base_unet, refiner_unet = pipelines.base.unet, pipelines.refiner.unet
    base_inputs = latent_inputs(base_unet, 2, args.size)  # CFG doubles batch 1
    refiner_inputs = latent_inputs(refiner_unet, 1, args.size)

    def step(unet, inputs):
        positional, keywords = inputs

        def call():
            with torch.no_grad():
                unet(*positional, **keywords)

        return call

    def unet_variant(compile_kwargs=None, backend=None, regional=False):
        def measure():
            result = {}
            for label, unet, inputs in (
                ("base_b2", base_unet, base_inputs),
                ("refiner_b1", refiner_unet, refiner_inputs),
            ):
                if regional:
                    unet.compile_repeated_blocks()
                elif compile_kwargs is not None:
                    unet.compile(**compile_kwargs)
                call = step(unet, inputs)
                if backend is not None:

                    def call(inner=call):
                        with sdpa_kernel([backend]):
                            inner()

                first_s, step_ms = timed_calls(call, warmup=3, runs=10)
                result[label] = {"first_call_s": first_s, "step_ms": step_ms}
                uncompile(unet)
            return result

        return measure

    recorder.variant("eager", unet_variant())
    for unet in (base_unet, refiner_unet):
        unet.to(memory_format=torch.channels_last)
    recorder.variant("eager_channels_last", unet_variant())
    recorder.variant("eager_cl_cudnn_attention", unet_variant(backend=SDPBackend.CUDNN_ATTENTION))
    recorder.variant("eager_cl_flash_attention", unet_variant(backend=SDPBackend.FLASH_ATTENTION))
    recorder.variant("regional_compile_cl", unet_variant(regional=True))
    recorder.variant(
        "full_compile_cl", unet_variant(compile_kwargs={"fullgraph": True, "dynamic": False})
    )
    recorder.variant(
        "full_compile_cl_cudagraphs",
        unet_variant(
            compile_kwargs={"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
        ),
    )

    def whole_generation():
        """The engine's `generate` with both UNets compiled whole with CUDA graphs: its
        time, and whether an in-place LoRA merge still reaches the captured graphs."""
        lora = random_lora(args.cache / "levers_lora.safetensors", base_unet.config, seed=1)

        def run(lora_path):
            loras = [AppliedLora(lora_path)] if lora_path else []
            return benchmark.latents_of(pipelines, seed=7, loras=loras)

        result = {}
        eager_lora, eager_plain = run(lora), run(None)
        result["eager_first_s"], result["eager_ms"] = timed_calls(
            lambda: run(lora), warmup=1, runs=3
        )
        for unet in (base_unet, refiner_unet):
            unet.compile(fullgraph=True, dynamic=False, mode="reduce-overhead")
        try:
            result["graphs_first_s"], result["graphs_ms"] = timed_calls(
                lambda: run(lora), warmup=2, runs=3
            )
            graphs_lora, graphs_plain = run(lora), run(None)
        finally:
            for unet in (base_unet, refiner_unet):
                uncompile(unet)

        def rel(value, reference):
            return round(benchmark.relative_error(value, reference), 5)

        result["graphs_vs_eager_with_lora"] = rel(graphs_lora, eager_lora)
        result["graphs_vs_eager_without_lora"] = rel(graphs_plain, eager_plain)
        result["lora_effect_eager"] = rel(eager_lora, eager_plain)
        result["lora_effect_graphs"] = rel(graphs_lora, graphs_plain)
        return result

    recorder.variant("whole_generation", whole_generation)

    def vae_variants():
        vae = pipelines.base.vae
        latents = torch.randn(1, 4, args.size // 8, args.size // 8, device=DEVICE) * 0.5
        result = {}
        reference = None
        for label, dtype, memory_format in (
            ("fp32_tf32", torch.float32, torch.contiguous_format),
            ("fp32_tf32_cl", torch.float32, torch.channels_last),
            ("bf16", torch.bfloat16, torch.contiguous_format),
            ("bf16_cl", torch.bfloat16, torch.channels_last),
        ):
            vae.to(dtype=dtype, memory_format=memory_format)
            x = latents.to(dtype)

            def call(x=x):
                with torch.no_grad():
                    return vae.decode(x, return_dict=False)[0]

            first_s, decode_ms = timed_calls(call, warmup=2, runs=5)
            image = call().float()
            if reference is None:
                reference = image
            result[label] = {
                "decode_ms": decode_ms,
                "rel_error_vs_fp32": round(benchmark.relative_error(image, reference), 5),
                "max_abs_error_vs_fp32": round(float((image - reference).abs().max()), 4),
            }
        vae.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return result

    recorder.variant("vae_decode", vae_variants)

    def text_encoding():
        base = pipelines.base

        def call():
            with torch.no_grad():
                base.encode_prompt(
                    "a photo of sks dog on a beach, golden hour",
                    device=DEVICE,
                    do_classifier_free_guidance=True,
                )

        first_s, ms = timed_calls(call, warmup=2, runs=5)
        return {"encode_prompt_cfg_ms": ms}

    recorder.variant("text_encoding", text_encoding)


def part_shapes(args, recorder: Recorder) -> None:
    """The Base UNet at SDXL's buckets and batch sizes: static graphs per shape against one
    dynamic-shape graph, fused QKV and Inductor's convolution/tuning flags. Compile times
    are what a worker's start would pay. (On an H200 on 2026-11-30 the first variant's
    dynamic-shape compile of the Base UNet had not finished after 8.5 minutes.)"""
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.utils import counters

    from sdxl_engine.buckets import SDXL_BUCKETS

    pipelines = load_pipelines(model_source(args))
    unet = pipelines.base.unet
    shapes = [(args.size, args.size), *[(w, h) for w, h in SDXL_BUCKETS if w != h]]

    def inputs_for(batch, width, height):
        positional, keywords = latent_inputs(unet, batch, args.size)
        positional = (
            torch.randn(batch, 4, height // 8, width // 8, device=DEVICE, dtype=unet.dtype),
            positional[1],
        )
        return positional, keywords

    def call_for(inputs):
        positional, keywords = inputs

        def call():
            with torch.no_grad():
                unet(*positional, **keywords)

        return call

    def variant(dynamic, fused=False, flags=False, batches=(2, 8), all_shapes=True):
        def measure():
            saved = {
                "duck": fx_config.use_duck_shape,
                "conv_1x1_as_mm": inductor_config.conv_1x1_as_mm,
                "coordinate_descent_tuning": inductor_config.coordinate_descent_tuning,
            }
            # Each bucket's height and width get their own symbol, whatever sizes the first
            # call has (a square would otherwise tie them together).
            fx_config.use_duck_shape = not dynamic
            if flags:
                inductor_config.conv_1x1_as_mm = True
                inductor_config.coordinate_descent_tuning = True
            if fused:
                unet.fuse_qkv_projections()
            counters.clear()
            unet.compile(fullgraph=True, dynamic=dynamic, mode="reduce-overhead")
            result = {}
            try:
                for batch in batches:
                    for width, height in shapes if (all_shapes and batch == 2) else shapes[:1]:
                        first_s, step_ms = timed_calls(
                            call_for(inputs_for(batch, width, height)), warmup=3, runs=10
                        )
                        result[f"b{batch}_{width}x{height}"] = {
                            "first_call_s": first_s,
                            "step_ms": step_ms,
                            "graphs": counters["stats"]["unique_graphs"],
                        }
                        print(result, flush=True)
            finally:
                uncompile(unet)
                if fused:
                    unet.unfuse_qkv_projections()
                fx_config.use_duck_shape = saved["duck"]
                inductor_config.conv_1x1_as_mm = saved["conv_1x1_as_mm"]
                inductor_config.coordinate_descent_tuning = saved["coordinate_descent_tuning"]
            return result

        return measure

    recorder.variant("dynamic", variant(dynamic=True))
    recorder.variant("static", variant(dynamic=False, all_shapes=False))
    recorder.variant("dynamic_fused_qkv", variant(dynamic=True, fused=True, all_shapes=False))

    recorder.variant("dynamic_inductor_flags", variant(dynamic=True, flags=True, all_shapes=False))


def part_train(args, recorder: Recorder) -> None:
    from peft import LoraConfig

    pipelines = load_pipelines(model_source(args), purpose="training")
    unet = pipelines.base.unet
    unet.requires_grad_(False)
    positional, keywords = latent_inputs(unet, 4, args.size)
    target = torch.randn_like(positional[0], dtype=torch.float32)

    def train_variant(lora_dtype, compile_kwargs=None, channels_last=False, regional=False):
        def measure():
            unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            unet.add_adapter(
                LoraConfig(
                    r=4,
                    lora_alpha=4,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGET_MODULES,
                )
            )
            lora = [p for p in unet.parameters() if p.requires_grad]
            for parameter in lora:
                parameter.data = parameter.data.to(lora_dtype)
            optimizer = torch.optim.AdamW(lora, lr=1e-4, fused=True)
            if regional:
                unet.compile_repeated_blocks()
            elif compile_kwargs is not None:
                unet.compile(**compile_kwargs)
            unet.train()
            benchmark.reset_peak()

            def train_step():
                prediction = unet(*positional, **keywords, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(prediction.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora, 1.0)
                optimizer.step()

            try:
                first_s, step_ms = timed_calls(train_step, warmup=3, runs=8)
            finally:
                uncompile(unet)
                unet.unload_lora()
                unet.eval()
            return {
                "first_step_s": first_s,
                "step_ms": step_ms,
                "images_per_s": round(4000 / step_ms, 2),
                "peak_gib": peak_gib(),
            }

        return measure

    full = {"fullgraph": True, "dynamic": False}
    recorder.variant("eager_fp32_lora", train_variant(torch.float32))
    recorder.variant("eager_fp32_lora_cl", train_variant(torch.float32, channels_last=True))
    recorder.variant("eager_bf16_lora_cl", train_variant(torch.bfloat16, channels_last=True))
    recorder.variant(
        "regional_fp32_lora_cl", train_variant(torch.float32, channels_last=True, regional=True)
    )
    recorder.variant(
        "full_compile_bf16_lora_cl",
        train_variant(torch.bfloat16, compile_kwargs=full, channels_last=True),
    )
    recorder.variant(
        "full_compile_fp32_lora_cl",
        train_variant(torch.float32, compile_kwargs=full, channels_last=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gen,train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdxl-bench"))
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    benchmark.GEN["height"] = benchmark.GEN["width"] = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"gen": part_gen, "train": part_train, "shapes": part_shapes}
    torch._dynamo.config.recompile_limit = 64
    for name in args.parts.split(","):
        recorder = Recorder(args.out / f"levers-{name}.json", {**environment(), "part": name})
        started = time.perf_counter()
        parts[name](args, recorder)
        recorder.results["part_wall_s"] = round(time.perf_counter() - started, 1)
        recorder.path.write_text(json.dumps(recorder.results, indent=2))


if __name__ == "__main__":
    main()
