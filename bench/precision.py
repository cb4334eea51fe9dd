"""How exact each half-precision generation path is, on the full-size SDXL pair.

The benchmark's correctness check compares the worker's final latents (LoRA merged into
the weights) with plain diffusers' (PEFT layers, unfused) in the same precision. This
script puts that difference beside the error every half-precision path makes anyway,
with the same seed, weights and LoRA:

- each path against the float32 truth (plain diffusers in float32);
- plain diffusers against itself with another attention kernel (SDPA's math backend
  instead of flash attention): the same function, rounded differently, which is the
  noise floor any two half-precision implementations meet;
- one Base UNet evaluation, ours against diffusers: the same function before 30 steps
  of sampling amplify its rounding;
- all of it in bfloat16 and in float16.

    python -m bench.precision --out results/

Writes `precision.json` under --out after every measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest.mock import patch

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.benchmark import (
    DEVICE,
    GEN,
    baseline_generate,
    baseline_pipelines,
    latent_inputs,
    latents_of,
    model_source,
    relative_error,
)
from bench.common import environment, random_lora
from sdxl_engine.generation import AppliedLora, load_pipelines
from sdxl_engine.generation.pipelines import HALF_PRECISION

SEED = 1234


def diffusers_latents(base, refiner, lora: Path) -> torch.Tensor:
    return baseline_generate(base, refiner, lora, 1, SEED, output_type="latent").float()


def unet_output(unet, inputs, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs, **kwargs).sample.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdxl-bench"))
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    GEN["height"] = GEN["width"] = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    source = model_source(args)
    results = {**environment(), "seed": SEED}

    def record(name: str, value) -> None:
        results[name] = value
        print(name, value, flush=True)
        (args.out / "precision.json").write_text(json.dumps(results, indent=2))

    truth_base, truth_refiner = baseline_pipelines(source, dtype=torch.float32)
    lora = random_lora(args.cache / "lora_a.safetensors", truth_base.unet.config, 1)
    truth = diffusers_latents(truth_base, truth_refiner, lora)
    torch.manual_seed(0)
    step_inputs = latent_inputs(truth_base.unet, 2, args.size)
    del truth_base, truth_refiner
    torch.cuda.empty_cache()

    half_precisions = (torch.bfloat16, torch.float16) if DEVICE == "cuda" else (torch.float32,)
    for dtype in half_precisions:
        name = str(dtype).removeprefix("torch.")
        base, refiner = baseline_pipelines(source, dtype=dtype)
        reference = diffusers_latents(base, refiner, lora)
        with sdpa_kernel(SDPBackend.MATH):
            other_kernel = diffusers_latents(base, refiner, lora)
        inputs, kwargs = _cast(step_inputs, dtype)
        base.load_lora_weights(str(lora))
        reference_step = unet_output(base.unet, inputs, kwargs)
        base.unload_lora_weights()
        del base, refiner
        torch.cuda.empty_cache()

        # The engine's generation pipelines, loaded straight into this precision (as the
        # reference is) instead of cast from float16 afterwards.
        with patch.dict(HALF_PRECISION, generation=dtype):
            ours = load_pipelines(source)
        fast = latents_of(ours, seed=SEED, loras=[AppliedLora(lora)])
        ours.loras.merge([AppliedLora(lora)])
        ours_step = unet_output(ours.base.unet, inputs, kwargs)
        ours.loras.restore()
        del ours
        torch.cuda.empty_cache()

        record(
            name,
            {
                "ours_vs_diffusers": relative_error(fast, reference),
                "diffusers_math_sdpa_vs_flash": relative_error(other_kernel, reference),
                "ours_vs_fp32": relative_error(fast, truth),
                "diffusers_vs_fp32": relative_error(reference, truth),
                "one_unet_step_ours_vs_diffusers": relative_error(ours_step, reference_step),
                "nan": bool(torch.isnan(fast).any() or torch.isnan(reference).any()),
            },
        )


def _cast(step_inputs, dtype):
    (latents, timesteps), kwargs = step_inputs
    cond = kwargs["added_cond_kwargs"]
    return (latents.to(dtype), timesteps), {
        "encoder_hidden_states": kwargs["encoder_hidden_states"].to(dtype),
        "added_cond_kwargs": {key: value.to(dtype) for key, value in cond.items()},
    }


if __name__ == "__main__":
    main()
