"""Continuing a LoRA (train_lora's init_lora, sdxl_engine.continuation): the run starts
from the parent's weights, at its rank, and its loss where the parent's ended."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training import train_lora
from sdxl_engine.training.checkpoints import run_fingerprint

from .conftest import STRONG_LORA_PARAMS
from .denoiser import LORA_RANK, LORA_RATE, REPEATS, RESOLUTION, SEED, TRIGGER, quadrants
from .denoiser import TRAINED_COLOURS as COLOURS

# So small that Adam's first update (about the rate itself) leaves the weights as they were.
NEGLIGIBLE_RATE = 1e-12


def _continued(
    pipelines: Pipelines, pairs: list[TrainingPair], params: TrainingParams, parent: Path, out: Path
) -> dict[str, torch.Tensor]:
    train_lora(pipelines, pairs, params, out, init_lora=parent)
    return load_file(out)


@pytest.mark.parametrize("with_text_encoders", [False, True])
def test_a_continued_run_starts_from_the_parents_weights_and_names_it(
    pipelines, training_pairs, trained_lora, text_encoder_lora, tmp_path, with_text_encoders
):
    parent = text_encoder_lora if with_text_encoders else trained_lora
    params = replace(
        STRONG_LORA_PARAMS,
        steps=1,
        learning_rate=NEGLIGIBLE_RATE,
        text_encoder_lr=NEGLIGIBLE_RATE if with_text_encoders else None,
        train_text_encoder=with_text_encoders,
    )
    child = _continued(pipelines, training_pairs, params, parent, tmp_path / "lora_2.safetensors")

    parent_tensors = load_file(parent)
    assert child.keys() == parent_tensors.keys()
    assert any(key.startswith("text_encoder") for key in child) == with_text_encoders
    for key, tensor in parent_tensors.items():
        # A fresh adapter would start from random down- and zero up-weights.
        assert torch.allclose(child[key], tensor, rtol=0, atol=1e-8), key
    header = read_lora_metadata(tmp_path / "lora_2.safetensors")
    assert header["sdxl_service.parent"] == parent.name
    assert header["sdxl_service.parent_sha256"] == sha256_file(parent)
    # The parent's 4 steps (its header says so: it counts them too), then this run's 1.
    assert read_lora_metadata(parent)["sdxl_service.total_steps_cumulative"] == "4"
    assert header["sdxl_service.total_steps_cumulative"] == "5"


def test_a_parent_of_another_rank_or_with_text_encoders_is_refused_naming_it(
    pipelines, training_pairs, trained_lora, text_encoder_lora, tmp_path
):
    out = tmp_path / "lora.safetensors"
    with pytest.raises(EngineError, match=r"rank 8 differs from the rank 4 of lora_1\.safetensors"):
        train_lora(
            pipelines,
            training_pairs,
            replace(STRONG_LORA_PARAMS, rank=8),
            out,
            init_lora=trained_lora,
        )
    with pytest.raises(EngineError, match="has text-encoder modules: continuing it trains"):
        train_lora(pipelines, training_pairs, STRONG_LORA_PARAMS, out, init_lora=text_encoder_lora)
    assert not out.exists()


def test_a_parent_that_does_not_fit_the_model_is_refused_naming_it(
    pipelines, training_pairs, trained_lora, tmp_path
):
    tensors = load_file(trained_lora)
    down_key = next(key for key in tensors if key.endswith(".to_q.lora.down.weight"))
    # The same module with one input feature more than the model's projection has.
    tensors[down_key] = torch.zeros(tensors[down_key].shape[0], tensors[down_key].shape[1] + 1)
    misfit = tmp_path / "misfit.safetensors"
    save_file(tensors, misfit)
    with pytest.raises(EngineError, match=r"misfit\.safetensors is not an SDXL LoRA.*to_q adds"):
        train_lora(
            pipelines,
            training_pairs,
            STRONG_LORA_PARAMS,
            tmp_path / "out.safetensors",
            init_lora=misfit,
        )


def test_the_resume_fingerprint_holds_the_parent(training_pairs):
    params, captions = TrainingParams(), ["a"] * len(training_pairs)
    alone = run_fingerprint(params, training_pairs, captions)
    on_one = run_fingerprint(params, training_pairs, captions, parent_sha256="1" * 64)
    on_another = run_fingerprint(params, training_pairs, captions, parent_sha256="2" * 64)
    assert len({alone, on_one, on_another}) == 3
    assert run_fingerprint(params, training_pairs, captions, parent_sha256=None) == alone


# The learning proof: on the denoiser (tests/engine/denoiser.py), a parent trained
# PARENT_STEPS steps on one image, then a run continuing it with the same settings and seed.
# The same seed draws the same batches, noise and timesteps, so the continued run's first
# steps meet exactly the draws of the parent's first steps, which were a fresh run's.
PARENT_STEPS = 100
CONTINUED_STEPS = 10
COMPARED_STEPS = 10


@pytest.mark.slow  # trains two LoRAs on the pretrained denoiser
def test_a_continued_runs_loss_starts_where_the_parents_ended(denoiser, tmp_path):
    image = tmp_path / "0.png"
    quadrants(COLOURS).save(image)
    pairs = [TrainingPair(image, "")] * REPEATS
    params = TrainingParams(
        steps=PARENT_STEPS,
        batch_size=REPEATS,
        learning_rate=LORA_RATE,
        rank=LORA_RANK,
        resolution=RESOLUTION,
        seed=SEED,
        trigger=TRIGGER,
        enable_bucket=False,
    )
    parent_losses: list[float] = []
    train_lora(
        denoiser,
        pairs,
        params,
        tmp_path / "parent.safetensors",
        on_progress=lambda step, total, loss: parent_losses.append(loss),
    )
    continued_losses: list[float] = []
    train_lora(
        denoiser,
        pairs,
        replace(params, steps=CONTINUED_STEPS),
        tmp_path / "child.safetensors",
        on_progress=lambda step, total, loss: continued_losses.append(loss),
        init_lora=tmp_path / "parent.safetensors",
    )
    # Mean losses of the first or last COMPARED_STEPS steps, measured with the seed 0, 1, 2:
    # a fresh run's start (the parent's) 0.472, 0.503, 0.491; the parent's end 0.391,
    # 0.450, 0.380; the continued run's start 0.355, 0.414, 0.399. So the continued run
    # starts 0.090-0.117 below a fresh run on the very same draws, and within 0.019-0.036
    # of where its parent ended.
    fresh_start = statistics.mean(parent_losses[:COMPARED_STEPS])
    parent_end = statistics.mean(parent_losses[-COMPARED_STEPS:])
    continued_start = statistics.mean(continued_losses[:COMPARED_STEPS])
    assert continued_start < fresh_start - 0.045
    assert abs(continued_start - parent_end) < abs(continued_start - fresh_start) - 0.025
