"""GPU check of what a run keeps along the way: sample images, checkpoints and resume, on
the full-size SDXL Base with random weights (as bench/benchmark.py builds it), as the
training worker runs them (bfloat16, compiled blocks, float32 master weights).

    python -m bench.watch_check --out $OUT [--compile]

Three runs of the same settings: one uninterrupted, one stopped after a checkpoint (as a
lost worker stops), and one resumed from that checkpoint. Writes watch.json: the time
each sample step and checkpoint took, the sample images' sizes, and how far the resumed
run's LoRA is from the uninterrupted one's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.benchmark import (
    MIXED_SHAPES,
    model_source,
    scaled_shapes,
    sync_time,
    training_images,
)
from bench.common import environment
from sdxl_engine.errors import TrainingCancelled
from sdxl_engine.generation import load_pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training import train_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sdxl-bench"))
    parser.add_argument("--preset", default="sdxl-random", help="tiny: a CPU dry run")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipelines = load_pipelines(model_source(args), purpose="training", compile_unets=args.compile)
    pairs = training_images(
        args.cache / "mixed", args.size, 12, scaled_shapes(MIXED_SHAPES, args.size)
    )
    params = TrainingParams(
        batch_size=4,
        steps=12,
        rank=32,
        seed=0,
        enable_bucket=True,
        resolution=args.size,
        min_snr_gamma=5.0,
        caption_dropout=0.05,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=2,
        checkpoint_every=4,
        sample_every=6,
        sample_prompts=["a photo of sks dog", "sks dog on a beach"],
    )
    results: dict = {**environment(), "steps": params.steps}
    events: list[tuple[str, int, float]] = []

    def timed_step(step: int, total: int, loss: float) -> None:
        events.append(("step", step, sync_time()))

    samples: list[tuple[int, list]] = []
    start = sync_time()
    whole = train_lora(
        pipelines,
        pairs,
        params,
        args.cache / "whole.safetensors",
        state_dir=args.cache / "state-whole",
        on_progress=timed_step,
        on_checkpoint=lambda step, path, sha256: events.append(("checkpoint", step, sync_time())),
        on_samples=lambda step, images: (
            samples.append((step, [image.size for _, image in images])),
            events.append(("samples", step, sync_time())),
        ),
    )
    results["uninterrupted_s"] = round(sync_time() - start, 1)
    # What happened after each step's progress report: a sample step or a checkpoint.
    after = {}
    for (kind, step, at), (_, _, before) in zip(events[1:], events, strict=False):
        if kind in ("samples", "checkpoint"):
            after[f"{kind}_at_step_{step}_s"] = round(at - before, 2)
    results["kept_along_the_way"] = after
    results["sample_sizes"] = samples

    done: list[int] = []
    try:
        train_lora(
            pipelines,
            pairs,
            replace(params, sample_every=0),
            args.cache / "never.safetensors",
            state_dir=args.cache / "state-resume",
            on_progress=lambda step, total, loss: done.append(step),
            should_stop=lambda: len(done) >= 6,
        )
    except TrainingCancelled:
        results["stopped_after_step"] = done[-1]
    resumed = train_lora(
        pipelines,
        pairs,
        replace(params, sample_every=0),
        args.cache / "resumed.safetensors",
        state_dir=args.cache / "state-resume",
    )
    results["resumed_from_step"] = resumed.resumed_from_step
    expected = load_file(args.cache / "whole.safetensors")
    actual = load_file(args.cache / "resumed.safetensors")
    difference = torch.cat([(actual[k] - expected[k]).flatten() for k in expected])
    reference = torch.cat([expected[k].flatten() for k in expected])
    results["resumed_vs_uninterrupted_rel"] = float(difference.norm() / reference.norm())
    results["final_loss"] = [whole.final_loss, resumed.final_loss]
    (args.out / "watch.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - start:.1f} s")
