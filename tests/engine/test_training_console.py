"""The training steps on the worker's console (stderr, its log): a tqdm bar on a terminal,
a line per tenth of the run elsewhere; never a line per step."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.training import train_lora
from sdxl_engine.training.console import StepProgress

from .conftest import STRONG_LORA_PARAMS


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_tiny_training_shows_its_steps_on_a_terminal_as_one_bar(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    console = _Terminal()

    train_lora(
        pipelines,
        training_pairs,
        replace(STRONG_LORA_PARAMS, steps=3),
        tmp_path / "l",
        console=console,
    )

    shown = console.getvalue()
    # One bar redrawn in place (carriage returns), not a line per step; it ends full,
    # with the rate and the last step's loss.
    assert shown.count("\n") <= 1 and "\r" in shown
    final = shown.rstrip("\n").split("\r")[-1]
    assert re.search(r"training: 100%.*\| 3/3 \[", final), final
    assert re.search(r"(s/step|step/s)", final) and re.search(r"loss \d+\.\d{4}", final)


def test_a_tiny_training_in_a_log_writes_a_line_per_tenth_and_the_last(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    log = io.StringIO()  # not a terminal: a log file or a pipe

    train_lora(
        pipelines, training_pairs, replace(STRONG_LORA_PARAMS, steps=3), tmp_path / "l", console=log
    )

    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "training: step 1/3 (33%)",
        "training: step 2/3 (66%)",
        "training: step 3/3 (100%)",
    ]
    assert all(re.search(r"loss \d+\.\d{4}, \d+\.\d\d s/step$", line) for line in lines)


def test_a_long_run_in_a_log_is_throttled_to_tenths() -> None:
    log = io.StringIO()
    progress = StepProgress(1000, log)
    for step in range(1, 1001):
        progress.step(step, 0.5)
    progress.close()

    lines = log.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1].startswith("training: step 1000/1000 (100%), loss 0.5000")
