"""GPU benchmark: the worker's engine against plain diffusers, side by side, full-size SDXL.

No SDXL weights can be downloaded where this runs, so it builds (once) the full-size
Base + Refiner pair with random weights from SDXL's published configs
(`SDXL_MODEL_PRESET=sdxl-random`) and loads it through the same `from_pretrained` path as
real weights. Timings depend on shapes, not on weight values.

    python -m bench.benchmark --parts gen,train,cold --out results/

Parts (all three fit one device call of under 10 minutes on an H100: ~9 minutes):
  gen    generation 1024², 30 steps, Base to 0.8 with CFG 7, Refiner after without CFG,
         batch 1 and 4, a rank-4 LoRA applied: ours (engine `generate`, LoRA merged in
         place) against plain diffusers (half precision, SDPA, `load_lora_weights` before
         and `unload_lora_weights` after each request); LoRA switch; correctness
  train  LoRA training at 1024², batch 4, rank 4: ours (engine `train_lora`) against the
         original's naive loop; peak VRAM; TFLOP/s from torch.utils.flop_counter; and the
         same training on a mixed set (portrait, landscape, square) with aspect buckets
  recipe the service's default recipe (a /train_lora body with only session_id) on 10
         and 30 photos of mixed aspect ratios, start to saved file: its wall time
  loras  generation 1024², 30 steps, batch 1 with no LoRA, one and two (a at 0.8 + b at
         0.5): ours compiled (merged in place) and its switch times one->one, one->two,
         two->none; plain diffusers loading one or two named adapters per request
         (`set_adapters`); the second LoRA's effect on the latents
  likeness  what issue 27's likeness features cost a training run at 1024², batch 4, rank
         32 (the service recipe's) on 8 photos, each against the same run without it, in the
         same process: masked_loss (a mask per photo), prior_preservation_weight, and the
         eval loss the run computes at step 0, each checkpoint and the end
  controls  issue 28's generation controls at 1024², compiled, one LoRA: a 154-token
         prompt, inpainting (only masked and whole), hires fix 1.5x, the face detail pass,
         each against plain diffusers' equivalent where it has one (its inpaint pipeline,
         a hand-written two-pass hires fix)
  cold   worker start to first image, in fresh processes: with the compile cache the gen
         part filled, and without compiling (the gen part times compiling from an empty
         cache: its warm_up_s)
Each part writes `<part>.json` under --out; `bench/report.py` merges them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from bench.common import environment, random_lora
from bench.report import report
from bench.serve_load import run_load
from sdxl_engine.dataset import TrainingPair
from sdxl_engine.generation import (
    AppliedLora,
    generate,
    load_pipelines,
    resolve_model_source,
    warm_up,
)
from sdxl_engine.parameters import GenerationParams, TrainingParams, training_params
from sdxl_engine.training import train_lora
from sdxl_engine.training.adapters import LORA_TARGET_MODULES

REPO = Path(__file__).resolve().parent.parent

PROMPT = "a photo of sks dog on a beach, golden hour"
GEN = {"height": 1024, "width": 1024, "guidance_scale": 7.0, "steps": 30}
HANDOVER = 0.8
# What a 16 GB card (16 GiB, e.g. RTX 4080, A4000) leaves to PyTorch's allocator once the
# CUDA context (about 0.5 GiB) and the driver have taken theirs.
SIXTEEN_GB_CARD_GIB = 15.0
# CUDA for the real benchmark; the CPU only for a dry run of the script (--preset tiny).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def peak_reserved_gib() -> float:
    """What the allocator held at most: the card must have this much (plus its context)."""
    return round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else 0.0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def timed_requests(request: Callable[[int], object], runs: int) -> tuple[float, list[float]]:
    """Seconds of a first call of `request(seed)`, which warms up (and may compile), and
    of each of the `runs` calls after it; call i gets seed i."""
    times = []
    for seed in range(runs + 1):
        start = sync_time()
        request(seed)
        times.append(sync_time() - start)
    return times[0], times[1:]


def summary(values: list[float]) -> dict:
    return {
        "p50_s": round(statistics.median(values), 4),
        "p95_s": round(percentile(values, 0.95), 4),
        "runs_s": [round(v, 4) for v in values],
    }


def model_source(args):
    return resolve_model_source(args.preset, "", "", args.cache)


def latent_inputs(unet, batch: int, size: int) -> tuple[tuple, dict]:
    """Random UNet inputs of a Base step: latents, timestep, text and SDXL conditioning."""
    config, dtype = unet.config, unet.dtype
    latent = size // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    args = (
        torch.randn(batch, config.in_channels, latent, latent, device=DEVICE, dtype=dtype),
        torch.randint(0, 1000, (batch,), device=DEVICE),
    )
    kwargs = {
        "encoder_hidden_states": torch.randn(
            batch, 77, config.cross_attention_dim, device=DEVICE, dtype=dtype
        ),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, device=DEVICE, dtype=dtype),
            "time_ids": torch.tensor(
                [[size, size, 0, 0, size, size]] * batch, device=DEVICE, dtype=dtype
            ),
        },
    }
    return args, kwargs


def training_images(
    folder: Path, size: int, count: int = 4, shapes: list[tuple[int, int]] | None = None
) -> list[TrainingPair]:
    """Random photos-to-be with captions (their content does not change timings): `size`
    squares, or (width, height) `shapes` taken in turn."""
    import numpy as np
    from PIL import Image

    shapes = shapes or [(size, size)]
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(count):
        width, height = shapes[index % len(shapes)]
        path = folder / f"{index}-{width}x{height}.png"
        if not path.exists():
            pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(path)
        pairs.append(TrainingPair(path, f"a photo of sks dog, view {index}"))
    return pairs


# Photos whose aspect ratios land in three SDXL buckets, four of each: 896x1152 (a 3:4
# portrait, resized to 896x1195 and cropped), 1216x832 and 1024x1024, so every batch of 4
# is full, as the square set's are.
MIXED_SHAPES = [(896, 1195), (1216, 832), (1024, 1024)]
# A phone's portrait and landscape, a square crop and a 16:9 frame: the recipe part's photos.
PHOTO_SHAPES = [(1200, 1600), (1600, 1200), (1280, 1280), (1920, 1080)]


def bucket_shapes(size: int) -> list[tuple[int, int]]:
    """SDXL's eight non-square buckets (width, height), scaled to `size` as the native side."""
    from sdxl_engine.buckets import bucket_sizes

    return [(w, h) for w, h in bucket_sizes(size, 8) if w != h]


def images_per_s(step_times: list[float], batch_size: int, skip: int) -> float:
    """Images per second over the steps after the first `skip` (compiling, warming up)."""
    timed = step_times[skip:]
    return round(batch_size * (len(timed) - 1) / (timed[-1] - timed[0]), 2)


# --- plain diffusers, as the original service does it ------------------------------------


def baseline_pipelines(source, dtype=torch.float16):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(source.base, torch_dtype=dtype).to(DEVICE)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        source.refiner, text_encoder_2=base.text_encoder_2, vae=base.vae, torch_dtype=dtype
    ).to(DEVICE)
    for pipeline in (base, refiner):
        pipeline.set_progress_bar_config(disable=True)
    return base, refiner


@contextlib.contextmanager
def baseline_loras(
    base, lora: Path | Sequence[AppliedLora], lora_times: dict | None = None
) -> Iterator[None]:
    """Plain diffusers' LoRA handling around one request: `load_lora_weights` before and
    `unload_lora_weights` after. A path: the original service's one unnamed LoRA. A list
    of AppliedLora: each loaded as a named adapter ("a", "b", ...), then `set_adapters`
    with their scales, as the original would do for several. `lora_times` gets the
    seconds of the loading (with set_adapters) under "load" and of the unloading under
    "unload"."""
    times = lora_times if lora_times is not None else {}
    start = sync_time()
    if isinstance(lora, Path):
        base.load_lora_weights(str(lora))
    else:
        names = [chr(ord("a") + index) for index in range(len(lora))]
        for name, applied in zip(names, lora, strict=True):
            base.load_lora_weights(str(applied.path), adapter_name=name)
        base.set_adapters(names, [applied.scale for applied in lora])
    times.setdefault("load", []).append(sync_time() - start)
    try:
        yield
    finally:
        start = sync_time()
        base.unload_lora_weights()
        times.setdefault("unload", []).append(sync_time() - start)


def baseline_generate(
    base,
    refiner,
    lora: Path | Sequence[AppliedLora],
    num_images: int,
    seed: int,
    output_type="pil",
    lora_times: dict | None = None,
    **size,
):
    with baseline_loras(base, lora, lora_times):
        generator = torch.Generator(DEVICE).manual_seed(seed)
        latents = base(
            prompt=PROMPT,
            num_images_per_prompt=num_images,
            height=size.get("height", GEN["height"]),
            width=size.get("width", GEN["width"]),
            guidance_scale=GEN["guidance_scale"],
            num_inference_steps=GEN["steps"],
            denoising_end=HANDOVER,
            generator=generator,
            output_type="latent",
        ).images
        return refiner(
            prompt=PROMPT,
            image=latents,
            num_images_per_prompt=num_images,
            num_inference_steps=GEN["steps"],
            denoising_start=HANDOVER,
            guidance_scale=1.0,
            generator=generator,
            output_type=output_type,
        ).images


# --- parts ----------------------------------------------------------------------------------


def make_loras(cache: Path, unet_config: dict) -> list[Path]:
    """The two random LoRAs, a and b, of the gen and loras parts."""
    return [
        random_lora(cache / f"lora_{name}.safetensors", unet_config, seed)
        for name, seed in (("a", 1), ("b", 2))
    ]


def switch_ms(
    merger,
    before: Callable[[int], list[AppliedLora]],
    after: Callable[[int], list[AppliedLora]],
) -> float:
    """Milliseconds `merger` takes from `before(i)`'s LoRAs merged to `after(i)`'s, as
    between two requests: the median of 10 switches, the first two left out."""
    switches = []
    for index in range(10):
        merger.merge(before(index))
        start = sync_time()
        merger.merge(after(index))
        switches.append(sync_time() - start)
    merger.restore()
    return round(statistics.median(switches[2:]) * 1000, 2)


def latents_of(pipelines, **request) -> torch.Tensor:
    """The final latents `generate` would decode, for the correctness checks."""
    from sdxl_engine.generation import batch as generation

    captured = {}

    def capture(_pipelines, latents):
        captured["latents"] = latents.float().clone()
        return []

    original = generation.decode_latents
    generation.decode_latents = capture
    try:
        generate(pipelines, prompt=PROMPT, num_images=1, **{**GEN, **request})
    finally:
        generation.decode_latents = original
    return captured["latents"]


def gen_ours(args, source):
    """Our engine's numbers; returns them, the correctness latents, the LoRAs and dtype."""
    started = time.perf_counter()
    ours = load_pipelines(source, compile_unets=args.compile)
    results: dict = {"compile": args.compile, "load_s": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    warm_up(ours)  # what the generation worker does at start: compile, capture graphs
    results["warm_up_s"] = round(time.perf_counter() - started, 1)
    loras = make_loras(args.cache, ours.base.unet.config)

    def ours_with_lora(num_images: int) -> Callable[[int], object]:
        return lambda seed: generate(
            ours,
            prompt=PROMPT,
            num_images=num_images,
            seed=seed,
            loras=[AppliedLora(loras[0])],
            **GEN,
        )

    for num_images, runs in ((1, args.runs), (4, max(3, args.runs // 2))):
        first_s, times = timed_requests(ours_with_lora(num_images), runs)
        results[f"ours_b{num_images}_first_s"] = round(first_s, 2)
        results[f"ours_b{num_images}"] = summary(times)

    # SDXL's other buckets at batch 1: the first request of each shape (which captures its
    # CUDA graphs) and the ones after it.
    results["ours_bucket_first_s"], results["ours_bucket"] = {}, {}
    for width, height in bucket_shapes(args.size):
        shape = {**GEN, "width": width, "height": height}
        first_s, times = timed_requests(
            lambda seed, shape=shape: generate(
                ours, prompt=PROMPT, seed=seed, loras=[AppliedLora(loras[0])], **shape
            ),
            args.bucket_runs,
        )
        results["ours_bucket_first_s"][f"{width}x{height}"] = round(first_s, 2)
        results["ours_bucket"][f"{width}x{height}"] = summary(times)
        print("bucket", width, height, results["ours_bucket"][f"{width}x{height}"], flush=True)

    # Two LoRAs in one request (loras: a at 0.8, b at 0.5) against one: merged into the
    # same weights, so the steps cost the same and only the merge takes longer.
    two_loras = [AppliedLora(loras[0], 0.8), AppliedLora(loras[1], 0.5)]
    _, times = timed_requests(
        lambda seed: generate(ours, prompt=PROMPT, seed=seed, loras=two_loras, **GEN), args.runs
    )
    results["ours_b1_two_loras"] = summary(times)

    # LoRA switch: session A's LoRA to session B's, as between two requests; and from one
    # LoRA to a request with two.
    merger = ours.loras
    for key, before, after in (
        (
            "lora_switch_ms",
            lambda i: [AppliedLora(loras[i % 2])],
            lambda i: [AppliedLora(loras[(i + 1) % 2])],
        ),
        ("lora_switch_two_ms", lambda i: [AppliedLora(loras[i % 2])], lambda i: two_loras),
    ):
        results[key] = switch_ms(merger, before, after)

    # Per-step cost of having a LoRA applied: whole requests with and without one.
    _, times = timed_requests(
        lambda seed: generate(ours, prompt=PROMPT, num_images=1, seed=seed, **GEN), args.runs
    )
    plain = statistics.median(times)
    results["ours_b1_without_lora_p50_s"] = round(plain, 4)
    results["lora_cost_per_step_ms"] = round(
        (results["ours_b1"]["p50_s"] - plain) / GEN["steps"] * 1000, 2
    )

    # Correctness: same seed, same weights, same LoRA as the plain-diffusers reference; and
    # the LoRA must reach the captured graphs (merged in place, not ignored).
    with_lora = latents_of(ours, seed=1234, loras=[AppliedLora(loras[0])])
    without_lora = latents_of(ours, seed=1234)
    results["ours_lora_effect_rel"] = relative_error(with_lora, without_lora)
    # What ran from per-shape CUDA graphs, and any shape that could not be captured.
    results["unet_graphs"] = {
        name: {
            "captured": len(graphs.graphs),
            "compiled_shapes": len(graphs.compiled_shapes),
            "uncapturable": len(graphs.uncapturable),
        }
        for name, graphs in zip(("base", "refiner"), ours.unet_graphs, strict=False)
    }
    width, height = bucket_shapes(args.size)[3]  # a portrait, run from a CUDA graph
    bucket = latents_of(ours, seed=1234, loras=[AppliedLora(loras[0])], width=width, height=height)
    return results, {"native": with_lora, (width, height): bucket}, loras, ours.dtype


def part_gen(args) -> dict:
    source = model_source(args)
    results, fast_by_shape, loras, dtype = gen_ours(args, source)
    fast = fast_by_shape.pop("native")
    reset_peak()  # ours is gone: the baselines get the card to themselves

    # Plain diffusers in the precision ours runs in: float16 on CUDA, the precision the
    # original service loads its pipelines in, so one set serves the correctness check
    # and the baseline timings.
    base, refiner = baseline_pipelines(source, dtype=dtype)
    # Correctness: same seed, same weights, same LoRA; final latents of ours (LoRA merged)
    # against plain diffusers' (PEFT layers, unfused).
    reference = baseline_generate(base, refiner, loras[0], 1, 1234, output_type="latent").float()
    results["max_rel_error_native"] = relative_error(fast, reference)
    results["nan"] = bool(torch.isnan(fast).any())
    # The same at another bucket, which ours runs from CUDA graphs of the eager UNets.
    for (width, height), latents in fast_by_shape.items():
        reference = baseline_generate(
            base, refiner, loras[0], 1, 1234, output_type="latent", width=width, height=height
        ).float()
        results[f"max_rel_error_{width}x{height}"] = relative_error(latents, reference)
        results["nan"] |= bool(torch.isnan(latents).any())
    results["max_rel_error"] = max(
        value for key, value in results.items() if key.startswith("max_rel_error_")
    )
    if args.skip_baseline:
        return results
    results.update(baseline_timings(base, refiner, loras, args.runs))
    del base, refiner
    reset_peak()

    if args.fp32_truth:
        # How far each half-precision path is from the float32 truth: merging the LoRA
        # should cost no more accuracy than diffusers' own unfused layers do.
        truth_base, truth_refiner = baseline_pipelines(source, dtype=torch.float32)
        truth = baseline_generate(
            truth_base, truth_refiner, loras[0], 1, 1234, output_type="latent"
        ).float()
        results["ours_vs_fp32_rel_error"] = relative_error(fast, truth)
        results["diffusers_vs_fp32_rel_error"] = relative_error(reference, truth)
    return results


def part_loras(args) -> dict:
    """Two LoRAs in one request against one and none, 1024², 30 steps, batch 1: ours
    (merged in place: a step costs the same, only the merge is longer) and plain diffusers
    (named adapters loaded per request, `set_adapters`), in the same run."""
    source = model_source(args)
    reset_peak()
    started = time.perf_counter()
    ours = load_pipelines(source, compile_unets=args.compile)
    results: dict = {"compile": args.compile, "load_s": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    warm_up(ours)  # as the generation worker does at start
    results["warm_up_s"] = round(time.perf_counter() - started, 1)
    a, b = make_loras(args.cache, ours.base.unet.config)
    one = [AppliedLora(a)]
    two = [AppliedLora(a, 0.8), AppliedLora(b, 0.5)]
    for label, loras in (("none", []), ("one", one), ("two", two)):
        first_s, times = timed_requests(
            lambda seed, loras=loras, ours=ours: generate(
                ours, prompt=PROMPT, seed=seed, loras=loras, **GEN
            ),
            args.runs,
        )
        results[f"ours_{label}_first_s"] = round(first_s, 2)
        results[f"ours_{label}"] = summary(times)
        print("ours", label, results[f"ours_{label}"], flush=True)
    results["ours_two_vs_one_p50"] = round(
        results["ours_two"]["p50_s"] / results["ours_one"]["p50_s"], 3
    )
    results["ours_two_minus_one_p50_ms"] = round(
        (results["ours_two"]["p50_s"] - results["ours_one"]["p50_s"]) * 1000, 1
    )
    # Switches between requests: session A's LoRA to session B's; one LoRA to the pair;
    # the pair to a request without LoRAs.
    results["switch_one_to_one_ms"] = switch_ms(
        ours.loras, lambda i: [AppliedLora((a, b)[i % 2])], lambda i: [AppliedLora((b, a)[i % 2])]
    )
    results["switch_one_to_two_ms"] = switch_ms(ours.loras, lambda i: one, lambda i: two)
    results["switch_two_to_none_ms"] = switch_ms(ours.loras, lambda i: two, lambda i: [])
    # The second LoRA reaches the weights: a + b's final latents differ from a's alone
    # (and a's from none's, for scale).
    with_one = latents_of(ours, seed=1234, loras=one)
    with_two = latents_of(ours, seed=1234, loras=two)
    without = latents_of(ours, seed=1234)
    results["two_vs_one_latents_rel"] = relative_error(with_two, with_one)
    results["one_vs_none_latents_rel"] = relative_error(with_one, without)
    results["nan"] = bool(torch.isnan(with_two).any())
    results["ours_peak_gib"] = peak_gib()
    dtype = ours.dtype
    with_two = with_two.cpu()
    del ours, with_one, without
    gc.collect()
    reset_peak()  # ours is gone: the baseline gets the card to itself
    # What was measured survives a run cut short in the baseline.
    (args.out / "loras-partial.json").write_text(json.dumps(results, indent=2))
    if args.skip_baseline:
        return results

    # Plain diffusers as the original service would do it, in float16 on CUDA.
    base, refiner = baseline_pipelines(source, dtype=dtype)
    # The baseline applies both adapters too: its a + b latents against ours.
    reference = baseline_generate(base, refiner, two, 1, 1234, output_type="latent").float()
    results["two_ours_vs_baseline_rel"] = relative_error(with_two, reference.cpu())
    runs = args.baseline_runs or args.runs
    for label, loras in (("one", [AppliedLora(a)]), ("two", two)):
        lora_times: dict = {}
        first_s, times = timed_requests(
            lambda seed, loras=loras, lora_times=lora_times, pipes=(base, refiner): (
                baseline_generate(*pipes, loras, 1, seed, lora_times=lora_times)
            ),
            runs,
        )
        results[f"baseline_{label}_first_s"] = round(first_s, 2)
        results[f"baseline_{label}"] = summary(times)
        # Per request, the timed ones: loading the adapters (with set_adapters), unloading.
        for phase in ("load", "unload"):
            results[f"baseline_{label}_lora_{phase}_ms"] = round(
                statistics.median(lora_times[phase][1:]) * 1000, 1
            )
        print("baseline", label, results[f"baseline_{label}"], flush=True)
    results["baseline_two_vs_one_p50"] = round(
        results["baseline_two"]["p50_s"] / results["baseline_one"]["p50_s"], 3
    )
    results["baseline_runs"] = runs
    results["baseline_peak_gib"] = peak_gib()
    del base, refiner
    gc.collect()
    reset_peak()
    return results


def baseline_timings(base, refiner, loras: list[Path], runs: int) -> dict:
    """Plain diffusers' requests at batch 1 and 4 with the first LoRA, and the time
    `load_lora_weights` takes for the second."""

    def baseline_requests(num_images: int) -> Callable[[int], object]:
        return lambda seed: baseline_generate(base, refiner, loras[0], num_images, seed)

    results = {
        f"baseline_b{num_images}": summary(timed_requests(baseline_requests(num_images), count)[1])
        for num_images, count in ((1, runs), (4, max(3, runs // 2)))
    }
    start = sync_time()
    base.load_lora_weights(str(loras[1]))
    results["baseline_lora_load_ms"] = round((sync_time() - start) * 1000, 1)
    base.unload_lora_weights()
    return results


def part_train(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    source = model_source(args)
    pairs = training_images(args.cache / "images", args.size)
    params = TrainingParams(batch_size=4, rank=4, steps=args.train_steps, seed=0)
    # A third of the steps warm up: compiling, and with buckets a shape's first batches.
    skip = max(2, args.train_steps // 3)
    # As the training worker loads them: the Base alone.
    ours = load_pipelines(source, purpose="training", compile_unets=args.compile)
    step_times: list[float] = []

    def on_progress(step: int, total: int, loss: float) -> None:
        step_times.append(sync_time())

    reset_peak()
    loaded_gib = round(torch.cuda.memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0
    if args.low_memory and DEVICE == "cuda":
        # Behave as a 16 GB card: the allocator fails past what such a card leaves to it.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(SIXTEEN_GB_CARD_GIB * 2**30 / total)
    start = sync_time()
    train_lora(
        ours,
        pairs,
        params,
        args.cache / "train_out.safetensors",
        on_progress=on_progress,
        low_memory=True if args.low_memory else None,
    )
    total_s = sync_time() - start
    results = {
        "ours_images_per_s": images_per_s(step_times, 4, skip),
        "ours_run_s": round(total_s, 2),
        "ours_loaded_gib": loaded_gib,
        "ours_peak_gib": peak_gib(),
        "ours_peak_reserved_gib": peak_reserved_gib(),
        "steps": args.train_steps,
    }
    if args.low_memory and DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
        results["memory_cap_gib"] = SIXTEEN_GB_CARD_GIB

    # The same training on portrait, landscape and square photos, each at its bucket.
    mixed = training_images(
        args.cache / "mixed", args.size, 12, scaled_shapes(MIXED_SHAPES, args.size)
    )
    step_times.clear()
    reset_peak()
    result = train_lora(
        ours,
        mixed,
        dataclasses.replace(params, enable_bucket=True, resolution=args.size),
        args.cache / "train_mixed.safetensors",
        on_progress=on_progress,
        low_memory=True if args.low_memory else None,
    )
    results["mixed_buckets"] = result.metadata["sdxl_service.buckets"]
    results["mixed_images_per_s"] = images_per_s(step_times, 4, skip)
    results["mixed_peak_gib"] = peak_gib()
    results["mixed_vs_square"] = round(
        results["mixed_images_per_s"] / results["ours_images_per_s"], 3
    )

    # FLOPs of one training step (UNet forward + backward at batch 4, 1024², LoRA rank 4).
    from peft import LoraConfig

    unet = ours.base.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGET_MODULES))
    inputs, kwargs = latent_inputs(unet, 4, args.size)
    counter = FlopCounterMode(display=False)
    # Counted eagerly: the counter sees aten operations, which compiled regions hide.
    with counter, torch.compiler.set_stance("force_eager"):
        unet(*inputs, **kwargs).sample.float().pow(2).mean().backward()
    step_flops = counter.get_total_flops()
    unet.unload_lora()
    results["step_tflop"] = round(step_flops / 1e12, 2)
    results["ours_tflops_per_s"] = round(step_flops / 1e12 * results["ours_images_per_s"] / 4, 1)
    del ours, unet
    reset_peak()

    if args.skip_baseline:
        return results
    results.update(naive_training(source, pairs, args.train_steps, args.size))
    results["baseline_tflops_per_s"] = round(
        step_flops / 1e12 * results["baseline_images_per_s"] / 4, 1
    )
    return results


def scaled_shapes(shapes: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """`shapes` (for SDXL's 1024) scaled to the benchmark's `size` (64 for a CPU dry run)."""
    return [(round(w * size / 1024), round(h * size / 1024)) for w, h in shapes]


def part_recipe(args) -> dict:
    """The default recipe, as a /train_lora body with only session_id gets it, on 10 and 30
    photos: wall time from the call to the saved file (the pipelines already loaded, as in
    a training worker), split into its stages."""
    source = model_source(args)
    ours = load_pipelines(source, purpose="training", compile_unets=args.compile)
    results = {}
    for count in (int(n) for n in args.recipe_images.split(",")):
        shapes = scaled_shapes(PHOTO_SHAPES, args.size)
        pairs = training_images(args.cache / f"photos-{count}", args.size, count, shapes)
        params = dataclasses.replace(training_params({}, count), seed=0)
        stages: dict[str, float] = {}
        reset_peak()
        start = sync_time()
        result = train_lora(
            ours,
            pairs,
            params,
            args.cache / f"recipe-{count}.safetensors",
            on_stage=lambda stage, stages=stages: stages.setdefault(stage, sync_time()),
        )
        end = sync_time()
        results[f"images_{count}"] = {
            "steps": result.steps,
            "batch_size": params.batch_size,
            "epochs": params.epochs,
            # Every image once an epoch (with buckets a batch may hold fewer than batch_size).
            "image_views": params.epochs * count,
            "rank": params.rank,
            "buckets": result.metadata["sdxl_service.buckets"],
            "wall_s": round(end - start, 1),
            "caching_s": round(stages["training"] - stages["caching"], 1),
            "training_s": round(stages["saving"] - stages["training"], 1),
            "saving_s": round(end - stages["saving"], 1),
            "peak_gib": peak_gib(),
        }
    return results


def masked_training_images(folder: Path, size: int, count: int) -> list[TrainingPair]:
    """training_images, each with a mask beside it (sdxl_engine.dataset.mask_path_for): a
    white ellipse over the middle third, as a face mask is."""
    from PIL import Image, ImageDraw

    from sdxl_engine.dataset import mask_path_for

    pairs = []
    for pair in training_images(folder, size, count):
        mask_path = mask_path_for(pair.image_path)
        if not mask_path.exists():
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse([size // 3, size // 4, 2 * size // 3, 3 * size // 4], 255)
            mask.save(mask_path)
        pairs.append(TrainingPair(pair.image_path, pair.caption, mask_path))
    return pairs


def part_likeness(args) -> dict:
    """Each likeness feature's cost per run against the same recipe without it: the steps'
    images per second (after the warm-up steps), and the eval loss's own time (step 0 is
    scored between caching and the first step, the end between the last step and saving).
    """
    source = model_source(args)
    ours = load_pipelines(source, purpose="training", compile_unets=args.compile)
    pairs = masked_training_images(args.cache / "masked", args.size, 8)
    plain = TrainingParams(
        batch_size=4,
        rank=32,
        steps=args.train_steps,
        seed=0,
        resolution=args.size,
        trigger="sks",
        min_snr_gamma=5.0,
    )
    variants = {
        "plain": plain,
        "masked_loss": dataclasses.replace(plain, masked_loss=True),
        "prior_preservation": dataclasses.replace(
            plain, prior_preservation_weight=1.0, class_prompt="a photo of a dog"
        ),
    }
    skip = max(2, args.train_steps // 3)
    results: dict = {"photos": len(pairs), "steps": args.train_steps, "rank": 32}
    for name, params in variants.items():
        marks: dict[str, float] = {}
        step_times: list[float] = []
        reset_peak()
        start = sync_time()
        result = train_lora(
            ours,
            pairs,
            params,
            args.cache / f"likeness-{name}.safetensors",
            on_progress=lambda step, total, loss, times=step_times: times.append(sync_time()),
            on_stage=lambda stage, marks=marks: marks.setdefault(stage, sync_time()),
        )
        end = sync_time()
        results[name] = {
            "images_per_s": images_per_s(step_times, params.batch_size, skip),
            "wall_s": round(end - start, 1),
            # The last step to the saving stage: the final eval loss, all it does there.
            "eval_end_s": round(marks["saving"] - step_times[-1], 2),
            "eval_images": int(result.metadata["sdxl_service.eval_images"]),
            "eval_loss": result.eval_loss,
            "peak_gib": peak_gib(),
        }
    for name in ("masked_loss", "prior_preservation"):
        results[name]["time_per_step_vs_plain"] = round(
            results["plain"]["images_per_s"] / results[name]["images_per_s"], 3
        )
    plain_step_s = plain.batch_size / results["plain"]["images_per_s"]
    results["eval_end_in_steps"] = round(results["plain"]["eval_end_s"] / plain_step_s, 2)
    return results


def naive_training(source, pairs: list[TrainingPair], steps: int, size: int) -> dict:
    """The original's loop: fp32 VAE encode and both text encoders every step, fp16 UNet
    with PEFT LoRA, autocast, GradScaler."""
    import numpy as np
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image

    half = torch.float16 if DEVICE == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(source.base, torch_dtype=half)
    pipe.to(DEVICE)
    pipe.vae.to(torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )
    cast_training_params(pipe.unet, dtype=torch.float32)
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scaler = torch.amp.GradScaler(DEVICE, enabled=DEVICE == "cuda")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack(
        [
            torch.from_numpy(
                np.asarray(Image.open(p.image_path).convert("RGB"), np.float32) / 127.5 - 1
            ).permute(2, 0, 1)
            for p in pairs
        ]
    ).to(DEVICE)
    captions = [p.caption for p in pairs]
    time_ids = torch.tensor(
        [[size, size, 0, 0, size, size]] * len(pairs), device=DEVICE, dtype=half
    )
    pipe.unet.train()
    reset_peak()
    stamps = []
    for _ in range(steps):
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt(
                captions, device=DEVICE, do_classifier_free_guidance=False
            )
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (len(pairs),), device=DEVICE)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(DEVICE, dtype=half, enabled=DEVICE == "cuda"):
            prediction = pipe.unet(
                noisy.to(half),
                timesteps,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stamps.append(sync_time())
    warm = stamps[2:]
    return {
        "baseline_images_per_s": round(4 * (len(warm) - 1) / (warm[-1] - warm[0]), 2),
        "baseline_peak_gib": peak_gib(),
    }


COLD_START = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, {repo!r})
import torch
from sdxl_engine.generation import generate, load_pipelines, resolve_model_source, warm_up
from pathlib import Path
pipelines = load_pipelines(resolve_model_source({preset!r}, "", "", Path({cache!r})),
                           compile_unets={compile})
loaded = time.perf_counter() - start
warm_up(pipelines)
warmed = time.perf_counter() - start
generate(pipelines, prompt="x", seed=0, height={size}, width={size}, steps=30)
if torch.cuda.is_available():
    torch.cuda.synchronize()
print("COLD", loaded, warmed, time.perf_counter() - start)
"""


# --- issue 28: generation controls ---------------------------------------------------------

# Phrases added to PROMPT until it takes two of A1111's 75-token chunks: the cross-attention
# then sees 154 positions instead of 77.
LONG_PROMPT_PHRASES = (
    "(detailed fur:1.2)",
    "wet sand",
    "small waves",
    "soft rim light",
    "shallow depth of field",
    "85mm lens",
    "film grain",
    "warm colours",
    "seagulls in the distance",
    "footprints",
    "a red ball beside the dog",
    "the sun low over the sea",
    "long shadows",
    "a breeze",
    "[blurry background]",
    "sharp focus on the eyes",
    "professional photograph",
    "clouds lit orange and pink",
    "reflections on the wet sand",
    "a lighthouse far away",
    "pebbles and shells",
    "a calm sea",
    "a natural pose",
    "award winning",
    "high detail",
)


def long_prompt(tokenizer) -> tuple[str, int]:
    """PROMPT grown by LONG_PROMPT_PHRASES to between 100 and 150 tokens (two chunks), and
    its token count."""
    prompt = PROMPT
    for phrase in LONG_PROMPT_PHRASES:
        grown = f"{prompt}, {phrase}"
        if len(tokenizer(grown).input_ids) - 2 > 145:
            break
        prompt = grown
    return prompt, len(tokenizer(prompt).input_ids) - 2


def controls_images(size: int) -> tuple[bytes, bytes]:
    """A starting photo (scikit-image's astronaut, a real face, scaled to size²) and an
    inpainting mask of its lower-right quarter's centre (a quarter of each side)."""
    import io

    from PIL import Image, ImageDraw
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
    mask = Image.new("L", (size, size), 0)
    side = size // 4
    ImageDraw.Draw(mask).rectangle(
        [size - 2 * side, size - 2 * side, size - side, size - side], 255
    )
    encoded = []
    for image in (photo, mask):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded[0], encoded[1]


def unique_graphs() -> int:
    """torch.compile's graphs so far: more after a request means it compiled inside it."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def controls_request(**fields) -> GenerationParams:
    """One request of the controls part: the gen part's settings (1024², 30 steps, CFG 7,
    Refiner from 0.8) with `fields`."""
    return GenerationParams(**{"prompt": PROMPT, **GEN, **fields}).filled()


def part_controls(args) -> dict:
    """Issue 28's generation controls on the worker's compiled pipelines, one rank-4 LoRA
    applied, each p50 beside plain diffusers' equivalent where it has one (pipelines loaded
    once, the LoRA loaded once and kept: the controls' own cost, not LoRA handling):

    - a two-chunk (154-token) prompt against the plain one: ours runs the new cross-attention
      length from a CUDA graph captured on its first request; diffusers has no long prompts
      (it cuts at 77 tokens), so its time is a one-chunk request's;
    - inpainting of a 256² square, "only masked" (the crop, with its padding, redone at
      1024²) and the whole picture, against diffusers' StableDiffusionXLInpaintPipeline
      over the Base then the Refiner on the whole 1024² image;
    - hires fix 1.5× from 1024² (latent upscale, 0.7 strength: 21 of 30 steps at 1536²)
      against the same two passes written out with diffusers' pipelines;
    - the face detail pass (ADetailer's defaults: strength 0.4, padding 32) on a 1024²
      photo with one face (scikit-image's astronaut), alone: diffusers has no face pass.

    `compiles_in_requests` counts torch.compile graphs made after the worker's warm-up,
    which a request would have waited for: it must stay 0.
    """
    source = model_source(args)
    results, lora = controls_ours(args, source)
    if args.skip_baseline:
        return results
    gc.collect()
    torch.cuda.empty_cache()
    reset_peak()  # ours is gone: the baselines get the card to themselves
    results.update(controls_diffusers(args, source, lora, results))
    return results


def controls_ours(args, source) -> tuple[dict, Path]:
    """The controls part's figures for our engine, and the LoRA it applied."""
    from PIL import Image

    from sdxl_engine.generation.faces import redo_faces
    from sdxl_engine.generation.render import Progress, render_batch
    from sdxl_engine.parameters import FaceDetail, HiresFix

    ours = load_pipelines(source, compile_unets=args.compile)
    started = time.perf_counter()
    warm_up(ours)
    results: dict = {"compile": args.compile, "warm_up_s": round(time.perf_counter() - started, 1)}
    lora = make_loras(args.cache, ours.base.unet.config)[0]
    photo, mask = controls_images(args.size)
    prompt_154, results["long_prompt_tokens"] = long_prompt(ours.base.tokenizer)
    graphs_after_warm_up = unique_graphs()

    def ours_render(**fields) -> Callable[[int], object]:
        return lambda seed: render_batch(
            ours, [controls_request(seed=seed, **fields)], loras=[AppliedLora(lora)]
        )

    face_image = Image.open(io.BytesIO(photo)).convert("RGB")
    face_request = controls_request(seed=0, face_detail=FaceDetail())

    def ours_faces(seed: int) -> list[int] | None:
        request = dataclasses.replace(face_request, seed=seed)
        _, counts = redo_faces(
            ours, [request], [[face_image]], loras=[AppliedLora(lora)], progress=Progress(None, 0)
        )
        return counts[0]

    results["faces_found"] = ours_faces(0)
    cases = {
        "prompt_77": ours_render(),
        "prompt_154": ours_render(prompt=prompt_154),
        "inpaint_masked": ours_render(
            init_image=photo, mask=mask, strength=0.75, inpaint_area="masked"
        ),
        "inpaint_whole": ours_render(init_image=photo, mask=mask, strength=0.75),
        "hires_1_5x": ours_render(
            hires=HiresFix(scale=1.5, upscaler="latent", denoising_strength=0.7)
        ),
        "face_detail": ours_faces,
    }
    for name, request in cases.items():
        first_s, times = timed_requests(request, args.runs)
        results[f"ours_{name}"] = {"first_s": round(first_s, 2), **summary(times)}
    results["compiles_in_requests"] = unique_graphs() - graphs_after_warm_up
    results["ours_peak_gib"] = peak_gib()
    return results, lora


def controls_diffusers(args, source, lora: Path, ours: dict) -> dict:
    """The controls part's plain-diffusers figures, with speed-ups against `ours`."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    photo, mask = controls_images(args.size)
    results: dict = {}
    base, refiner = baseline_pipelines(source)
    base.load_lora_weights(str(lora))
    inpaint_base = StableDiffusionXLInpaintPipeline.from_pipe(base)
    inpaint_refiner = StableDiffusionXLInpaintPipeline.from_pipe(refiner)
    for pipeline in (inpaint_base, inpaint_refiner):
        pipeline.set_progress_bar_config(disable=True)
    photo_image = Image.open(io.BytesIO(photo)).convert("RGB")
    mask_image = Image.open(io.BytesIO(mask)).convert("L")
    size = {"height": args.size, "width": args.size}

    def two_stage(seed: int, prompt: str = PROMPT) -> torch.Tensor:
        generator = torch.Generator(DEVICE).manual_seed(seed)
        latents = base(
            prompt=prompt,
            guidance_scale=GEN["guidance_scale"],
            num_inference_steps=GEN["steps"],
            denoising_end=HANDOVER,
            generator=generator,
            output_type="latent",
            **size,
        ).images
        return refiner(
            prompt=prompt,
            image=latents,
            num_inference_steps=GEN["steps"],
            denoising_start=HANDOVER,
            guidance_scale=1.0,
            generator=generator,
            output_type="latent",
        ).images

    def decoded(latents: torch.Tensor) -> object:
        return base.image_processor.postprocess(
            base.vae.decode(
                latents.to(base.vae.dtype) / base.vae.config.scaling_factor, return_dict=False
            )[0],
            output_type="pil",
        )

    def diffusers_plain(seed: int) -> object:
        with torch.no_grad():
            return decoded(two_stage(seed))

    def diffusers_inpaint(seed: int) -> object:
        generator = torch.Generator(DEVICE).manual_seed(seed)
        stage = {"image": photo_image, "mask_image": mask_image, "strength": 0.75, **size}
        latents = inpaint_base(
            prompt=PROMPT,
            guidance_scale=GEN["guidance_scale"],
            num_inference_steps=GEN["steps"],
            denoising_end=HANDOVER,
            generator=generator,
            output_type="latent",
            **stage,
        ).images
        return inpaint_refiner(
            prompt=PROMPT,
            num_inference_steps=GEN["steps"],
            denoising_start=HANDOVER,
            guidance_scale=1.0,
            generator=generator,
            # The Base's latents as the image: diffusers' documented Base + Refiner inpaint.
            **{**stage, "image": latents},
        ).images

    def diffusers_hires(seed: int) -> object:
        # A1111's hires fix written out: the first image's latents, bilinear to 1.5x, then
        # img2img at 0.7 (Base to 0.8 of its schedule, the Refiner after).
        with torch.no_grad():
            first = two_stage(seed)
            upscaled = torch.nn.functional.interpolate(
                first, scale_factor=1.5, mode="bilinear", antialias=False
            )
        generator = torch.Generator(DEVICE).manual_seed(seed)
        handover = 1 - 0.7 * (1 - HANDOVER)
        latents = img2img_base(
            prompt=PROMPT,
            image=upscaled,
            strength=0.7,
            guidance_scale=GEN["guidance_scale"],
            num_inference_steps=GEN["steps"],
            denoising_end=handover,
            generator=generator,
            output_type="latent",
        ).images
        with torch.no_grad():
            return decoded(
                refiner(
                    prompt=PROMPT,
                    image=latents,
                    num_inference_steps=GEN["steps"],
                    denoising_start=handover,
                    guidance_scale=1.0,
                    generator=generator,
                    output_type="latent",
                ).images
            )

    img2img_base = StableDiffusionXLImg2ImgPipeline(**base.components)
    img2img_base.set_progress_bar_config(disable=True)
    baselines = {
        "prompt_77": diffusers_plain,
        "inpaint_whole": diffusers_inpaint,
        "hires_1_5x": diffusers_hires,
    }
    for name, request in baselines.items():
        first_s, times = timed_requests(request, args.runs)
        results[f"diffusers_{name}"] = {"first_s": round(first_s, 2), **summary(times)}
        results[f"speedup_{name}"] = round(
            results[f"diffusers_{name}"]["p50_s"] / ours[f"ours_{name}"]["p50_s"], 2
        )
    results["speedup_inpaint_masked_vs_diffusers_whole"] = round(
        results["diffusers_inpaint_whole"]["p50_s"] / ours["ours_inpaint_masked"]["p50_s"], 2
    )
    results["diffusers_peak_gib"] = peak_gib()
    return results


def part_cold(args) -> dict:
    results = {}
    inductor_cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    compiled_runs = {"eager": False, "compiled_empty_cache": True, "compiled_warm_cache": True}
    for label in args.cold_runs.split(","):
        compiled = compiled_runs[label]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
        if label == "compiled_empty_cache":
            subprocess.run(["rm", "-rf", str(inductor_cache)], check=True)
        code = COLD_START.format(
            repo=str(REPO),
            cache=str(args.cache),
            compile=compiled,
            preset=args.preset,
            size=args.size,
        )
        start = time.perf_counter()
        output = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400
        )
        wall = time.perf_counter() - start
        line = [x for x in output.stdout.splitlines() if x.startswith("COLD")]
        if not line:
            results[label] = {"error": output.stderr[-2000:]}
            continue
        _, loaded, warmed, first_image = line[0].split()
        results[label] = {
            "process_wall_s": round(wall, 1),
            "loaded_s": round(float(loaded), 1),
            "warmed_up_s": round(float(warmed), 1),
            "first_image_s": round(float(first_image), 1),
        }
        # Each worker start takes minutes: what was measured survives a run cut short.
        (args.out / "cold-partial.json").write_text(json.dumps(results, indent=2))
    return results


def part_serve(args) -> dict:
    """Images per minute over HTTP, one client and eight (bench/serve_load.py), with the
    service's models in --cache."""
    os.environ["SDXL_MODEL_CACHE_DIR"] = str(args.cache)
    preset = args.preset
    return run_load(args.out, args.cache.parent / "service-data", preset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="gen,train,cold")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdxl-bench"))
    parser.add_argument("--runs", type=int, default=5, help="timed requests at batch 1")
    parser.add_argument(
        "--bucket-runs", type=int, default=3, help="timed requests at each other bucket"
    )
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument(
        "--recipe-images", default="10,30", help="recipe: the numbers of photos to train on"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets")
    parser.add_argument("--skip-baseline", action="store_true", help="ours only")
    parser.add_argument(
        "--baseline-runs",
        type=int,
        default=0,
        help="loras: timed plain-diffusers requests of each kind (default: --runs)",
    )
    parser.add_argument(
        "--fp32-truth",
        action="store_true",
        help="gen: also compare both paths with plain diffusers in float32 (~30 s more)",
    )
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="train: in low-memory mode, capped at what a 16 GB card leaves to PyTorch",
    )
    parser.add_argument(
        "--cold-runs",
        default="compiled_warm_cache,eager",
        help="cold: which worker starts to time, of compiled_warm_cache, eager and "
        "compiled_empty_cache (the gen part, run first on a fresh machine, times compiling "
        "from an empty cache already: its warm_up_s)",
    )
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    GEN["height"] = GEN["width"] = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    # One compile cache for every part and worker start of the run, as a worker keeps it.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.cache / "inductor"))
    parts = {
        "gen": part_gen,
        "train": part_train,
        "cold": part_cold,
        "recipe": part_recipe,
        "serve": part_serve,
        "loras": part_loras,
        "likeness": part_likeness,
        "controls": part_controls,
    }
    for name in args.parts.split(","):
        started = time.perf_counter()
        results = {**environment(), "part": name, **parts[name](args)}
        results["part_wall_s"] = round(time.perf_counter() - started, 1)
        compiled_parts = ("gen", "train", "recipe", "loras", "likeness", "controls")
        suffix = "-compiled" if name in compiled_parts and args.compile else ""
        suffix += "-low-memory" if name == "train" and args.low_memory else ""
        (args.out / f"{name}{suffix}.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2), flush=True)
    if all(any(args.out.glob(f"{part}*.json")) for part in ("gen", "train", "cold")):
        report(args.out, results_dir=args.out)  # the table, last


if __name__ == "__main__":
    main()
