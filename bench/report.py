"""Merges one benchmark run's part files into the results JSON and prints the table.

python bench/report.py bench/results/<run folder>   # writes bench/results/<date>-<card>.json
"""

import json
import sys
from pathlib import Path


def report(folder: Path, results_dir: Path | None = None) -> Path:
    """Merge the part files under `folder` into `<results_dir>/<date>-<card>.json` (by
    default beside `folder`), print the table, and return the merged file's path."""
    parts = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    gen = parts.get("gen-compiled") or parts["gen"]
    train = parts.get("train-compiled") or parts["train"]
    cold = parts["cold"]
    card = gen["card"]
    summary = {
        "card": card,
        "torch": gen["torch"],
        "diffusers": gen["diffusers"],
        "date": gen["date"],
        # The parts may come from separate calls: each one's command.
        "command": " ; ".join(dict.fromkeys(part["command"] for part in (gen, train, cold))),
        "compiled": gen.get("compile", False),
        "gen_p50_s": gen["ours_b1"]["p50_s"],
        "gen_p95_s": gen["ours_b1"]["p95_s"],
        "gen_baseline_p50_s": gen["baseline_b1"]["p50_s"],
        "gen_baseline_p95_s": gen["baseline_b1"]["p95_s"],
        "gen_b4_p50_s": gen["ours_b4"]["p50_s"],
        "gen_b4_baseline_p50_s": gen["baseline_b4"]["p50_s"],
        "train_images_per_s": train["ours_images_per_s"],
        "train_baseline_images_per_s": train["baseline_images_per_s"],
        "train_peak_gib": train["ours_peak_gib"],
        "train_baseline_peak_gib": train["baseline_peak_gib"],
        "train_tflops_per_s": train["ours_tflops_per_s"],
        "train_step_tflop": train["step_tflop"],
        "lora_switch_ms": gen["lora_switch_ms"],
        "baseline_lora_load_ms": gen["baseline_lora_load_ms"],
        "gen_b1_without_lora_p50_s": gen["ours_b1_without_lora_p50_s"],
        "lora_cost_per_step_ms": gen["lora_cost_per_step_ms"],
        "lora_effect_rel": gen["ours_lora_effect_rel"],
        "warm_up_s": gen["warm_up_s"],
        "cold_start_s": cold["compiled_warm_cache"]["first_image_s"],
        # Timed by the cold part, or else by the gen part's own compile from scratch.
        "cold_start_empty_cache_s": cold.get("compiled_empty_cache", {}).get(
            "first_image_s", round(gen["load_s"] + gen["warm_up_s"], 1)
        ),
        "cold_start_eager_s": cold["eager"]["first_image_s"],
        "max_rel_error": gen["max_rel_error"],
        "ours_vs_fp32_rel_error": gen.get("ours_vs_fp32_rel_error"),
        "diffusers_vs_fp32_rel_error": gen.get("diffusers_vs_fp32_rel_error"),
        "nan": gen["nan"],
    }
    if "train-low-memory" in parts:
        low_memory = parts["train-low-memory"]
        summary["train_low_memory_images_per_s"] = low_memory["ours_images_per_s"]
        summary["train_low_memory_peak_gib"] = low_memory["ours_peak_gib"]
        summary["train_low_memory_peak_reserved_gib"] = low_memory.get("ours_peak_reserved_gib")
        summary["train_low_memory_cap_gib"] = low_memory.get("memory_cap_gib")
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    out = (results_dir or folder.parent) / f"{summary['date']}-{slug}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        (
            "generation 1024², 30 steps, batch 1, LoRA: p50 / p95 s",
            f"{summary['gen_p50_s']} / {summary['gen_p95_s']}",
            f"{summary['gen_baseline_p50_s']} / {summary['gen_baseline_p95_s']}",
            f"{summary['gen_baseline_p50_s'] / summary['gen_p50_s']:.2f}x",
        ),
        (
            "generation batch 4: p50 s",
            summary["gen_b4_p50_s"],
            summary["gen_b4_baseline_p50_s"],
            f"{summary['gen_b4_baseline_p50_s'] / summary['gen_b4_p50_s']:.2f}x",
        ),
        (
            "training 1024², batch 4, rank 4: images/s",
            summary["train_images_per_s"],
            summary["train_baseline_images_per_s"],
            f"{summary['train_images_per_s'] / summary['train_baseline_images_per_s']:.2f}x",
        ),
        (
            "training peak VRAM GiB",
            summary["train_peak_gib"],
            summary["train_baseline_peak_gib"],
            "",
        ),
        ("LoRA switch ms", summary["lora_switch_ms"], summary["baseline_lora_load_ms"], ""),
        (
            "per-step cost of a LoRA applied, ms (batch 1 with minus without)",
            summary["lora_cost_per_step_ms"],
            "",
            "",
        ),
        (
            "worker start to first image s (warm cache / empty / eager)",
            f"{summary['cold_start_s']} / {summary['cold_start_empty_cache_s']} / "
            f"{summary['cold_start_eager_s']}",
            "",
            "",
        ),
        (
            "final latents, rel. error vs plain diffusers, same precision",
            f"{summary['max_rel_error']:.4f}",
            "",
            "",
        ),
    ]
    if "train_low_memory_peak_gib" in summary:
        rows.append(
            (
                "low-memory training: images/s, peak GiB (allocated / reserved)",
                f"{summary['train_low_memory_images_per_s']}, "
                f"{summary['train_low_memory_peak_gib']} / "
                f"{summary['train_low_memory_peak_reserved_gib']}",
                "",
                "",
            )
        )
    print(f"{'what':60} {'ours':>24} {'plain diffusers':>16} {'ratio':>7}")
    for what, ours, baseline, ratio in rows:
        print(f"{what:60} {ours!s:>24} {baseline!s:>16} {ratio:>7}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    report(Path(sys.argv[1]))
