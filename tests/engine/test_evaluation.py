"""A score for every checkpoint: the eval loss on fixed timesteps and noise (the same
weights score the same number; it falls as a learning run goes on), the photos held out
from training, and the similarity of the samples to the photos."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdxl_engine.buckets import MAX_UPSCALE
from sdxl_engine.dataset import TrainingPair, held_out_indices
from sdxl_engine.errors import EngineError
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training import run as run_module
from sdxl_engine.training import train_lora
from sdxl_engine.training.caching import Sizing, encode_images
from sdxl_engine.training.evaluation import eval_images, eval_loss
from sdxl_engine.training.similarity import (
    ImageEmbedder,
    build_random_embedder,
    mean_similarity,
)

from .denoiser import (
    LORA_RANK,
    LORA_RATE,
    RESOLUTION,
    SEED,
    TRAINED_COLOURS,
    TRIGGER,
    lora_applied,
    quadrants,
)

PREFIX = "sdxl_service."


def test_held_out_photos_are_evenly_spaced() -> None:
    assert held_out_indices(15, 0) == []
    assert held_out_indices(15, 1) == [7]
    assert held_out_indices(15, 3) == [2, 7, 12]
    assert held_out_indices(4, 3) == [0, 2, 3]  # distinct even when nearly all are


def test_held_out_photos_never_reach_the_optimiser(
    pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoded_for: list[list[Path]] = []

    def recording(pipelines, pairs, *args, **kwargs):
        encoded_for.append([pair.image_path for pair in pairs])
        return encode_images(pipelines, pairs, *args, **kwargs)

    monkeypatch.setattr(run_module, "encode_images", recording)
    params = TrainingParams(batch_size=2, steps=2, rank=4, seed=1, eval_holdout=1)
    result = train_lora(pipelines, training_pairs, params, tmp_path / "lora.safetensors")

    photos = [pair.image_path for pair in training_pairs]
    held_out = photos[held_out_indices(3, 1)[0]]
    # The run's training images (what the optimiser's batches index) are the two others;
    # the held-out one is encoded apart, for the eval loss alone.
    assert encoded_for == [[photo for photo in photos if photo != held_out], [held_out]]
    metadata = result.metadata
    assert metadata[PREFIX + "num_images"] == "2"
    assert metadata[PREFIX + "eval_holdout"] == "1" and metadata[PREFIX + "eval_images"] == "1"
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)

    with pytest.raises(EngineError, match="eval_holdout must be from 0 to 2"):
        train_lora(
            pipelines, training_pairs, replace(params, eval_holdout=3), tmp_path / "no.safetensors"
        )


def test_the_tiny_embedder_builds_once_reloads_and_scores_within_minus_one_to_one(
    tmp_path: Path,
) -> None:
    folder = build_random_embedder(tmp_path / "clip")
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_random_embedder(tmp_path / "clip") == folder  # kept, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == built
    assert [path.name for path in tmp_path.iterdir()] == ["clip"]  # no staging left

    embedder = ImageEmbedder(str(folder), "cpu")
    red, blue = quadrants([(200, 20, 20)] * 4), quadrants([(20, 20, 200)] * 4)
    embeddings = embedder.embed([red, blue, red])
    assert embeddings.shape[0] == 3
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    assert mean_similarity(embeddings[:1], embeddings[2:]) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= mean_similarity(embeddings[:1], embeddings[1:2]) <= 1.0

    with pytest.raises(EngineError, match="SDXL_SIMILARITY_MODEL"):
        ImageEmbedder(str(tmp_path / "nothing"), "cpu")


@pytest.mark.slow  # trains a LoRA on the pretrained denoiser: about 10 s
def test_the_eval_loss_falls_over_the_checkpoints_and_scores_a_file_as_saved(
    denoiser: Pipelines, tmp_path: Path
) -> None:
    """One image listed 8 times (as test_learning's LoRA), checkpoints every 40 steps;
    the eval loss is then over the training photos (no photo held out)."""
    image = tmp_path / "0.png"
    quadrants(TRAINED_COLOURS).save(image)
    pairs = [TrainingPair(image, "")] * 8
    params = TrainingParams(
        steps=120,
        batch_size=8,
        learning_rate=LORA_RATE,
        rank=LORA_RANK,
        resolution=RESOLUTION,
        seed=SEED,
        trigger=TRIGGER,
        checkpoint_every=40,
        sample_every=80,
        sample_prompts=[TRIGGER],
    )
    checkpoints: dict[int, Path] = {}
    embedder = ImageEmbedder(str(build_random_embedder(tmp_path / "clip")), "cpu")
    result = train_lora(
        denoiser,
        pairs,
        params,
        tmp_path / "lora.safetensors",
        state_dir=tmp_path / "state",
        on_checkpoint=lambda step, path, sha256: checkpoints.setdefault(step, path),
        on_samples=lambda step, samples: None,
        embedder=embedder,
    )
    headers = {step: read_lora_metadata(path) for step, path in checkpoints.items()}
    headers[120] = result.metadata
    losses = {step: float(header[PREFIX + "eval_loss"]) for step, header in headers.items()}
    start = float(result.metadata[PREFIX + "eval_loss_start"])
    # Measured (seed 0): 0.508 at step 0 (the Base alone), then 0.440, 0.400 and 0.417 at
    # steps 40, 80, 120 (0.87, 0.79, 0.82 of the start): at a constant rate the last is not
    # always the best, which is what the score is for.
    assert sorted(losses) == [40, 80, 120]
    assert all(losses[step] < 0.93 * start for step in losses)
    assert min(losses.values()) < 0.9 * start
    assert losses[80] < 0.98 * losses[40] and losses[120] < 0.98 * losses[40]
    assert result.eval_loss == losses[120]
    # Samples at 80 and 120: scored by the (random, meaningless) embedder, only there.
    assert PREFIX + "similarity" not in headers[40]
    for step in (80, 120):
        assert -1.0 <= float(headers[step][PREFIX + "similarity"]) <= 1.0
    assert result.similarity == float(headers[120][PREFIX + "similarity"])

    # The same file scored again, merged as a generation applies it, any random state
    # meanwhile: the same number (to the merge's rounding), every time.
    encoded = encode_images(
        denoiser,
        pairs,
        [TRIGGER] * len(pairs),
        Sizing([(RESOLUTION, RESOLUTION)], 8, MAX_UPSCALE),
        8,
        torch.Generator().manual_seed(SEED),
        lambda: False,
        with_empty_caption=False,
    )
    images = eval_images(encoded, None)
    with lora_applied(denoiser, checkpoints[80]):
        first = eval_loss(denoiser, images, encode_captions=False)
        torch.manual_seed(123)
        torch.randn(100)
        second = eval_loss(denoiser, images, encode_captions=False)
    assert first == second
    assert first == pytest.approx(losses[80], rel=1e-4)
