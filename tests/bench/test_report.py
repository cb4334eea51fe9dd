"""bench.report: merging a benchmark run's part files into the results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import report

# The keys the GPU-speed issue asks every results file to have.
REQUIRED_KEYS = {
    "card",
    "gen_p50_s",
    "gen_baseline_p50_s",
    "gen_b4_p50_s",
    "train_images_per_s",
    "train_baseline_images_per_s",
    "train_peak_gib",
    "lora_switch_ms",
    "cold_start_s",
    "max_rel_error",
    "gen_bucket_p50_s",
    "gen_concurrent_images_per_min",
    "gen_single_client_images_per_min",
}
ENVIRONMENT = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "diffusers": "0.42.1"}


def _write_parts(folder: Path, with_low_memory: bool, with_load: bool = True) -> None:
    folder.mkdir()
    common = {**ENVIRONMENT, "date": "2026-11-27", "command": "python bench/benchmark.py"}
    parts = {
        "gen-compiled": {
            **common,
            "compile": True,
            "load_s": 7.3,
            "warm_up_s": 195.5,
            "ours_b1": {"p50_s": 1.09, "p95_s": 1.1},
            "ours_b4": {"p50_s": 4.95},
            "baseline_b1": {"p50_s": 5.91, "p95_s": 7.49},
            "baseline_b4": {"p50_s": 7.67},
            "lora_switch_ms": 18.6,
            "baseline_lora_load_ms": 978.0,
            "ours_b1_without_lora_p50_s": 1.08,
            "lora_cost_per_step_ms": 0.25,
            "ours_lora_effect_rel": 0.05,
            "max_rel_error": 0.00145,
            "nan": False,
            "ours_bucket": {"832x1216": {"p50_s": 1.43}, "1216x832": {"p50_s": 1.18}},
            "ours_bucket_first_s": {"832x1216": 2.13, "1216x832": 2.76},
        },
        "train-compiled": {
            **common,
            "ours_images_per_s": 12.23,
            "baseline_images_per_s": 4.28,
            "ours_peak_gib": 25.18,
            "baseline_peak_gib": 35.86,
            "ours_tflops_per_s": 177.2,
            "step_tflop": 57.95,
        },
        "cold": {
            **common,
            "compiled_warm_cache": {"first_image_s": 61.0},
            "eager": {"first_image_s": 22.7},
        },
    }
    if with_load:
        parts["serve-load"] = {
            **common,
            "command": "python bench/serve_load.py",
            "single_client": {"clients": 1, "images_per_min": 41.58},
            "concurrent": {"clients": 8, "images_per_min": 38.48},
        }
    if with_low_memory:
        parts["train-low-memory"] = {
            **common,
            "ours_images_per_s": 4.04,
            "ours_peak_gib": 9.77,
            "ours_peak_reserved_gib": 11.28,
            "memory_cap_gib": 15.0,
        }
    for name, figures in parts.items():
        (folder / f"{name}.json").write_text(json.dumps(figures))


def test_merged_file_has_the_required_keys_and_is_named_by_date_and_card(tmp_path):
    _write_parts(tmp_path / "run", with_low_memory=False)

    merged_path = report(tmp_path / "run")

    assert merged_path == tmp_path / "2026-11-27-h100-80gb-hbm3.json"
    merged = json.loads(merged_path.read_text())
    assert REQUIRED_KEYS <= merged.keys()
    assert (merged["gen_p50_s"], merged["gen_baseline_p50_s"]) == (1.09, 5.91)
    assert merged["cold_start_s"] == 61.0
    # No cold start from an empty cache in this run: the gen part's own compile stands in.
    assert merged["cold_start_empty_cache_s"] == 202.8
    assert merged["gen_bucket_p50_s"] == {"832x1216": 1.43, "1216x832": 1.18}
    assert merged["gen_concurrent_images_per_min"] == 38.48
    assert merged["command"] == "python bench/benchmark.py ; python bench/serve_load.py"
    assert "train_low_memory_peak_gib" not in merged


def test_a_run_without_buckets_or_load_merges_with_those_figures_empty(tmp_path):
    """Runs made before the bucket and HTTP-load figures existed still merge and print."""
    _write_parts(tmp_path / "run", with_low_memory=False, with_load=False)
    folder = tmp_path / "run"
    gen = json.loads((folder / "gen-compiled.json").read_text())
    del gen["ours_bucket"], gen["ours_bucket_first_s"]
    (folder / "gen-compiled.json").write_text(json.dumps(gen))

    merged = json.loads(report(folder).read_text())

    assert merged["gen_bucket_p50_s"] is None
    assert merged["gen_concurrent_images_per_min"] is None


def test_low_memory_part_is_merged_and_printed(tmp_path, capsys):
    _write_parts(tmp_path / "run", with_low_memory=True)

    merged = json.loads(report(tmp_path / "run", results_dir=tmp_path).read_text())

    assert merged["train_low_memory_peak_gib"] == 9.77
    assert merged["train_low_memory_cap_gib"] == 15.0
    assert "4.04, 9.77 / 11.28" in capsys.readouterr().out


def test_docs_table_is_replaced_between_its_marks_with_targets_judged(tmp_path):
    _write_parts(tmp_path / "run", with_low_memory=True)
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# Benchmarks\n\nintro\n<!-- benchmark-table:begin -->\nold table\n"
        "<!-- benchmark-table:end -->\n\nnotes\n"
    )

    report(tmp_path / "run", docs=docs)

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n<!-- benchmark-table:begin -->\n")
    assert text.endswith("<!-- benchmark-table:end -->\n\nnotes\n")
    assert "old table" not in text
    assert "NVIDIA H100 80GB HBM3, torch 2.11.0, diffusers 0.42.1, 2026-11-27" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "|" in line}
    assert rows["generation 1024², 30 steps, batch 1, LoRA: p50 / p95 s"].endswith("| no |")
    assert rows["LoRA switch ms"].endswith("| yes |")
    # 1.43 s is over 1.1 x 1.09 s; the slowest first request of a new shape is 2.76 s.
    bucket_row = rows["generation, each other SDXL bucket, batch 1, LoRA: p50 s (slowest)"]
    assert "1.18-1.43 (832x1216)" in bucket_row and bucket_row.endswith("| no |")
    assert rows["a shape never seen before: its first request s (slowest)"].endswith("| yes |")
    load_row = next(row for name, row in rows.items() if name.startswith("images/min over HTTP"))
    assert "38.48 / 41.58" in load_row and "0.93x" in load_row and load_row.endswith("| no |")
    assert rows["final latents, rel. error vs plain diffusers, same precision"].endswith("| yes |")
    assert rows["low-memory training: images/s, peak GiB (allocated / reserved)"].endswith(
        "| yes |"
    )
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".tmp"] == []


def test_docs_without_the_marks_are_left_untouched(tmp_path):
    _write_parts(tmp_path / "run", with_low_memory=False)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")

    with pytest.raises(SystemExit, match="benchmark-table:begin"):
        report(tmp_path / "run", docs=docs)

    assert docs.read_text() == "# Benchmarks\n"
