from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.errors import TrainingCancelled
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training import train_lora
from sdxl_engine.training.checkpoints import RESUME_STATE_NAME

# Every random stream in play: buckets, caption dropout, Min-SNR, a warm-up and cosine.
PARAMS = TrainingParams(
    batch_size=2,
    steps=8,
    learning_rate=5e-2,
    rank=4,
    seed=7,
    checkpoint_every=3,
    lr_scheduler="cosine",
    lr_warmup_steps=2,
    min_snr_gamma=5.0,
    caption_dropout=0.3,
    enable_bucket=True,
)


# With prior preservation too: the class prompts from the captions without the trigger.
PRIOR_PARAMS = replace(PARAMS, trigger="sks", prior_preservation_weight=1.0)


def _interrupted_after(
    steps: int,
    pipelines: Pipelines,
    pairs: list[TrainingPair],
    state_dir: Path,
    tmp: Path,
    params: TrainingParams = PARAMS,
) -> None:
    """A run stopped after `steps` steps, as a lost worker stops: its state stays."""
    done: list[int] = []
    with pytest.raises(TrainingCancelled):
        train_lora(
            pipelines,
            pairs,
            params,
            tmp / "never.safetensors",
            state_dir=state_dir,
            on_progress=lambda step, total, loss: done.append(step),
            should_stop=lambda: len(done) >= steps,
        )
    assert not (tmp / "never.safetensors").exists()


@pytest.mark.parametrize("params", [PARAMS, PRIOR_PARAMS], ids=["plain", "prior"])
def test_a_resumed_run_ends_with_the_lora_of_an_uninterrupted_one(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path, params: TrainingParams
) -> None:
    whole = train_lora(pipelines, training_pairs, params, tmp_path / "whole.safetensors")
    _interrupted_after(5, pipelines, training_pairs, tmp_path / "state", tmp_path, params)
    events: list[tuple[str, int]] = []

    resumed = train_lora(
        pipelines,
        training_pairs,
        params,
        tmp_path / "resumed.safetensors",
        state_dir=tmp_path / "state",
        on_progress=lambda step, total, loss: events.append(("step", step)),
        on_resume=lambda step: events.append(("resumed", step)),
    )

    assert resumed.resumed_from_step == 3  # the last checkpoint before the stop at 5
    # Told before the first step, then steps 4 to 8.
    assert events == [("resumed", 3), *(("step", step) for step in range(4, 9))]
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5)
    expected, actual = (
        load_file(tmp_path / "whole.safetensors"),
        load_file(tmp_path / "resumed.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_come_every_n_steps_but_the_last_as_lora_files(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    handed: list[tuple[int, Path, str]] = []
    train_lora(
        pipelines,
        training_pairs,
        PARAMS,
        tmp_path / "lora.safetensors",
        state_dir=tmp_path / "state",
        on_checkpoint=lambda step, path, sha256: handed.append((step, path, sha256)),
    )

    assert [step for step, _, _ in handed] == [3, 6]  # step 8's file is the LoRA itself
    step, path, _ = handed[0]
    metadata = read_lora_metadata(path)
    assert metadata["sdxl_service.checkpoint_step"] == "3"
    assert metadata["sdxl_service.steps"] == "8"
    assert (tmp_path / "state" / RESUME_STATE_NAME).is_file()
    final = load_file(tmp_path / "lora.safetensors")
    assert load_file(path).keys() == final.keys()
    assert any(not torch.equal(load_file(path)[k], final[k]) for k in final)


def test_a_checkpoint_equals_a_run_that_ends_at_its_step(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    # With a constant rate the first steps of a longer run are a shorter run's steps.
    constant = replace(PARAMS, lr_scheduler="constant", lr_warmup_steps=0)
    handed: dict[int, Path] = {}
    train_lora(
        pipelines,
        training_pairs,
        constant,
        tmp_path / "long.safetensors",
        state_dir=tmp_path / "state",
        on_checkpoint=lambda step, path, sha256: handed.setdefault(step, path),
    )
    short = replace(constant, steps=3, checkpoint_every=0)
    train_lora(pipelines, training_pairs, short, tmp_path / "short.safetensors")

    expected, checkpoint = load_file(tmp_path / "short.safetensors"), load_file(handed[3])
    for key in expected:
        torch.testing.assert_close(checkpoint[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_state_of_other_settings_is_ignored_and_the_run_starts_over(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    _interrupted_after(4, pipelines, training_pairs, tmp_path / "state", tmp_path)
    other = replace(PARAMS, learning_rate=1e-2)
    steps: list[int] = []

    resumes: list[int] = []

    result = train_lora(
        pipelines,
        training_pairs,
        other,
        tmp_path / "other.safetensors",
        state_dir=tmp_path / "state",
        on_progress=lambda step, total, loss: steps.append(step),
        on_resume=resumes.append,
    )

    assert result.resumed_from_step == 0 and steps[0] == 1
    assert resumes == []  # not told of a resume that did not happen
