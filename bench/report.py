"""Merges one benchmark run's part files into the results JSON and prints the table.

    python -m bench.report bench/results/<run>     # writes bench/results/<date>-<card>.json
    python -m bench.report bench/results/<run> --docs docs/benchmarks.md

With --docs, the table (card, versions, date and command above it) also replaces what
stands between the `<!-- benchmark-table:begin -->` and `<!-- benchmark-table:end -->`
lines of that file.
"""

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from sdxl_engine.files import write_atomically

BEGIN_MARK = "<!-- benchmark-table:begin -->"
END_MARK = "<!-- benchmark-table:end -->"
# The GPU-speed issues' targets for one H100 or H200.
GEN_P50_TARGET_S = 0.8
GEN_BUCKET_TARGET_RATIO = 1.1  # each other bucket at most 1.1 x the 1024² figure
GEN_B4_TARGET_S = 2.8
CONCURRENCY_TARGET_RATIO = 1.5  # 8 clients' images per minute against one client's
# A first request of a shape never seen may capture graphs, never compile for minutes.
NEW_SHAPE_FIRST_TARGET_S = 10
TRAIN_TARGET_IMAGES_PER_S = 20
TRAIN_PEAK_TARGET_GIB = 35e9 / 2**30  # 35 GB
LORA_SWITCH_TARGET_MS = 30
LORA_STEP_COST_TOLERANCE = 0.02  # a request with a LoRA at most 2% slower: run-to-run noise
COLD_START_TARGET_S = 30
REL_ERROR_TARGET = 1e-2


def merge(folder: Path) -> dict:
    """The figures of the part files under `folder` (`gen*.json`, `train*.json`, `cold.json`,
    and `serve.json` or `serve-load.json` where the HTTP load ran)."""
    parts = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    gen = parts.get("gen-compiled") or parts["gen"]
    train = parts.get("train-compiled") or parts["train"]
    cold = parts["cold"]
    # benchmark.py --parts serve writes serve.json; serve_load.py alone, serve-load.json.
    serve = parts.get("serve") or parts.get("serve-load", {})
    summary = {
        "card": gen["card"],
        "torch": gen["torch"],
        "diffusers": gen["diffusers"],
        "date": gen["date"],
        # The parts may come from separate calls: each one's command.
        "command": " ; ".join(
            dict.fromkeys(part["command"] for part in (gen, train, cold, serve) if part)
        ),
        "compiled": gen.get("compile", False),
        "gen_p50_s": gen["ours_b1"]["p50_s"],
        "gen_p95_s": gen["ours_b1"]["p95_s"],
        "gen_baseline_p50_s": gen["baseline_b1"]["p50_s"],
        "gen_baseline_p95_s": gen["baseline_b1"]["p95_s"],
        "gen_b4_p50_s": gen["ours_b4"]["p50_s"],
        "gen_b4_baseline_p50_s": gen["baseline_b4"]["p50_s"],
        # Runs before this benchmark timed no other bucket and no HTTP load: None.
        "gen_bucket_p50_s": {
            shape: timing["p50_s"] for shape, timing in gen.get("ours_bucket", {}).items()
        }
        or None,
        "gen_bucket_first_s": gen.get("ours_bucket_first_s"),
        "gen_concurrent_images_per_min": serve.get("concurrent", {}).get("images_per_min"),
        "gen_single_client_images_per_min": serve.get("single_client", {}).get("images_per_min"),
        "gen_concurrent_clients": serve.get("concurrent", {}).get("clients"),
        "train_images_per_s": train["ours_images_per_s"],
        "train_baseline_images_per_s": train["baseline_images_per_s"],
        "train_peak_gib": train["ours_peak_gib"],
        "train_baseline_peak_gib": train["baseline_peak_gib"],
        "train_tflops_per_s": train["ours_tflops_per_s"],
        "train_baseline_tflops_per_s": train.get("baseline_tflops_per_s"),
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
        "cold_start_eager_s": cold.get("eager", {}).get("first_image_s"),
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
    return summary


class Row(NamedTuple):
    what: str
    ours: str
    baseline: str = ""  # plain diffusers, same run
    ratio: str = ""
    target: str = ""
    met: str = ""


def table_rows(s: dict) -> list[Row]:
    """A row for each figure of the summary."""

    def met(condition: bool) -> str:
        return "yes" if condition else "no"

    lora_slowdown = s["gen_p50_s"] / s["gen_b1_without_lora_p50_s"] - 1
    rows = [
        Row(
            "generation 1024², 30 steps, batch 1, LoRA: p50 / p95 s",
            f"{s['gen_p50_s']} / {s['gen_p95_s']}",
            f"{s['gen_baseline_p50_s']} / {s['gen_baseline_p95_s']}",
            f"{s['gen_baseline_p50_s'] / s['gen_p50_s']:.2f}x",
            target=f"<= {GEN_P50_TARGET_S} s p50",
            met=met(s["gen_p50_s"] <= GEN_P50_TARGET_S),
        ),
        Row(
            "generation batch 4: p50 s",
            str(s["gen_b4_p50_s"]),
            str(s["gen_b4_baseline_p50_s"]),
            f"{s['gen_b4_baseline_p50_s'] / s['gen_b4_p50_s']:.2f}x",
            target=f"<= {GEN_B4_TARGET_S} s p50",
            met=met(s["gen_b4_p50_s"] <= GEN_B4_TARGET_S),
        ),
        *new_rows(s, met),
        Row(
            "training 1024², batch 4, rank 4: images/s",
            str(s["train_images_per_s"]),
            str(s["train_baseline_images_per_s"]),
            f"{s['train_images_per_s'] / s['train_baseline_images_per_s']:.2f}x",
            target=f">= {TRAIN_TARGET_IMAGES_PER_S}",
            met=met(s["train_images_per_s"] >= TRAIN_TARGET_IMAGES_PER_S),
        ),
        Row(
            "training: TFLOP/s achieved (torch.utils.flop_counter's count)",
            str(s["train_tflops_per_s"]),
            str(s["train_baseline_tflops_per_s"]),
        ),
        Row(
            "training peak VRAM GiB",
            str(s["train_peak_gib"]),
            str(s["train_baseline_peak_gib"]),
            target=f"<= {TRAIN_PEAK_TARGET_GIB:.1f} (35 GB)",
            met=met(s["train_peak_gib"] <= TRAIN_PEAK_TARGET_GIB),
        ),
        Row(
            "LoRA switch ms",
            str(s["lora_switch_ms"]),
            str(s["baseline_lora_load_ms"]),
            f"{s['baseline_lora_load_ms'] / s['lora_switch_ms']:.0f}x",
            target=f"<= {LORA_SWITCH_TARGET_MS}",
            met=met(s["lora_switch_ms"] <= LORA_SWITCH_TARGET_MS),
        ),
        Row(
            "per-step cost of a LoRA applied, ms (batch 1 with minus without)",
            f"{s['lora_cost_per_step_ms']} ({lora_slowdown:+.1%} per request)",
            target=f"no slowdown (within {LORA_STEP_COST_TOLERANCE:.0%})",
            met=met(lora_slowdown <= LORA_STEP_COST_TOLERANCE),
        ),
        Row(
            "worker start to first image s (warm cache / empty / eager)",
            f"{s['cold_start_s']} / {s['cold_start_empty_cache_s']} / "
            f"{s['cold_start_eager_s'] or 'not run'}",
            target=f"<= {COLD_START_TARGET_S} warm",
            met=met(s["cold_start_s"] <= COLD_START_TARGET_S),
        ),
        Row(
            "final latents, rel. error vs plain diffusers, same precision",
            f"{s['max_rel_error']:.5f}" + (", NaN" if s["nan"] else ", no NaN"),
            target=f"< {REL_ERROR_TARGET:g}",
            met=met(s["max_rel_error"] < REL_ERROR_TARGET and not s["nan"]),
        ),
    ]
    if "train_low_memory_peak_gib" in s:
        cap = s["train_low_memory_cap_gib"]
        rows.append(
            Row(
                "low-memory training: images/s, peak GiB (allocated / reserved)",
                f"{s['train_low_memory_images_per_s']}, {s['train_low_memory_peak_gib']} / "
                f"{s['train_low_memory_peak_reserved_gib']}",
                target=f"fits {cap} GiB (16 GB card)" if cap else "",
                met=met(s["train_low_memory_peak_reserved_gib"] <= cap) if cap else "",
            )
        )
    return rows


def new_rows(s: dict, met) -> list[Row]:
    """The rows of the figures only later runs have: other buckets, a new shape's first
    request, many clients over HTTP."""
    rows = []
    if s.get("gen_bucket_p50_s"):
        buckets = s["gen_bucket_p50_s"]
        slowest = max(buckets, key=buckets.get)
        limit = GEN_BUCKET_TARGET_RATIO * s["gen_p50_s"]
        rows.append(
            Row(
                "generation, each other SDXL bucket, batch 1, LoRA: p50 s (slowest)",
                f"{min(buckets.values()):.2f}-{buckets[slowest]:.2f} ({slowest})",
                target=f"<= {GEN_BUCKET_TARGET_RATIO} x 1024² = {limit:.2f} s",
                met=met(buckets[slowest] <= limit),
            )
        )
        firsts = s["gen_bucket_first_s"]
        rows.append(
            Row(
                "a shape never seen before: its first request s (slowest)",
                str(max(firsts.values())),
                target=f"no compile in a request (<= {NEW_SHAPE_FIRST_TARGET_S} s)",
                met=met(max(firsts.values()) <= NEW_SHAPE_FIRST_TARGET_S),
            )
        )
    if s.get("gen_concurrent_images_per_min"):
        ratio = s["gen_concurrent_images_per_min"] / s["gen_single_client_images_per_min"]
        rows.append(
            Row(
                f"images/min over HTTP, {s['gen_concurrent_clients']} clients / one client "
                "(1024², LoRA a, b, none)",
                f"{s['gen_concurrent_images_per_min']} / {s['gen_single_client_images_per_min']}",
                ratio=f"{ratio:.2f}x",
                target=f">= {CONCURRENCY_TARGET_RATIO}x",
                met=met(ratio >= CONCURRENCY_TARGET_RATIO),
            )
        )
    return rows


def markdown(summary: dict) -> str:
    """The table in Markdown, with what it was measured on and how."""
    lines = [
        f"{summary['card']}, torch {summary['torch']}, diffusers {summary['diffusers']}, "
        f"{summary['date']}: `{summary['command']}`",
        "",
        "| what | ours | plain diffusers, same run | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    return "\n".join(lines) + "\n"


def replace_docs_block(docs: Path, text: str) -> None:
    """Put `text` between the begin and end marks of `docs`, atomically."""
    content = docs.read_text()
    begin, end = content.find(BEGIN_MARK), content.find(END_MARK)
    if begin < 0 or end < begin:
        raise SystemExit(f"{docs} has no {BEGIN_MARK} ... {END_MARK} block")
    content = content[: begin + len(BEGIN_MARK)] + "\n" + text + content[end:]
    write_atomically(docs, lambda tmp_path: tmp_path.write_text(content))


def report(folder: Path, results_dir: Path | None = None, docs: Path | None = None) -> Path:
    """Merge the part files under `folder` into `<results_dir>/<date>-<card>.json` (by
    default beside `folder`), print the table, put it into `docs` if given, and return
    the merged file's path."""
    summary = merge(folder)
    slug = summary["card"].lower().replace("nvidia ", "").replace(" ", "-")
    out = (results_dir or folder.parent) / f"{summary['date']}-{slug}.json"
    write_atomically(
        out, lambda tmp_path: tmp_path.write_text(json.dumps(summary, indent=2) + "\n")
    )
    widths = (62, 24, 16, 7, 26, 4)
    header = ("what", "ours", "plain diffusers", "ratio", "target", "met?")
    for row in [header, *table_rows(summary)]:
        cells = [f"{row[0]:<{widths[0]}}"]
        cells += [f"{cell:>{width}}" for cell, width in zip(row[1:], widths[1:], strict=True)]
        print(" ".join(cells))
    print(f"wrote {out}")
    if docs is not None:
        replace_docs_block(docs, markdown(summary))
        print(f"updated the table in {docs}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a run's part files")
    parser.add_argument("--docs", type=Path, help="a Markdown file with the table's marks")
    arguments = parser.parse_args()
    report(arguments.folder, docs=arguments.docs)
