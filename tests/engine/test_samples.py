from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.training import train_lora
from sdxl_engine.training.samples import default_sample_prompts

PARAMS = TrainingParams(
    batch_size=2, steps=4, learning_rate=5e-2, rank=4, seed=3, caption_dropout=0.3
)


def test_default_prompts_are_the_trigger_then_the_first_distinct_captions() -> None:
    captions = ["sks, a dog", "sks, a dog", "sks, a cat", "sks, a cow", "sks, a hen"]
    assert default_sample_prompts("sks", captions) == ["sks", "sks, a dog", "sks, a cat"]
    assert default_sample_prompts(None, captions) == ["sks, a dog", "sks, a cat", "sks, a cow"]


def test_samples_come_every_n_steps_at_the_native_size_and_change_as_the_lora_learns(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    received: list[tuple[int, list[tuple[str, Image.Image]]]] = []
    params = replace(PARAMS, sample_every=2, sample_prompts=["a red square", "a blue tile"])

    train_lora(
        pipelines,
        training_pairs,
        params,
        tmp_path / "lora.safetensors",
        on_samples=lambda step, samples: received.append((step, samples)),
    )

    assert [step for step, _ in received] == [2, 4]
    for _, samples in received:
        assert [prompt for prompt, _ in samples] == ["a red square", "a blue tile"]
        assert all(image.size == (64, 64) and image.mode == "RGB" for _, image in samples)
    first, last = received[0][1][0][1], received[1][1][0][1]
    assert first.tobytes() != last.tobytes()  # the same seed: only the LoRA moved
    assert pipelines.base.unet.training is False  # put back after the run


def test_sampling_leaves_the_training_and_its_random_streams_untouched(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    plain = train_lora(pipelines, training_pairs, PARAMS, tmp_path / "plain.safetensors")
    watched = train_lora(
        pipelines,
        training_pairs,
        replace(PARAMS, sample_every=1),
        tmp_path / "watched.safetensors",
        on_samples=lambda step, samples: None,
    )

    assert watched.final_loss == plain.final_loss
    expected, actual = (
        load_file(tmp_path / "plain.safetensors"),
        load_file(tmp_path / "watched.safetensors"),
    )
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_a_run_also_samples_at_its_last_step(
    pipelines: Pipelines, training_pairs: list[TrainingPair], tmp_path: Path
) -> None:
    """Issue 25: as kohya does, the finished LoRA has samples even when sample_every (given,
    or a quarter of the run by default) does not divide the run."""
    for sample_every, expected in ((None, [2, 4, 5]), (3, [3, 5])):
        received: list[tuple[int, list[tuple[str, Image.Image]]]] = []
        params = replace(PARAMS, steps=5, sample_every=sample_every, sample_prompts=["a dog"])
        train_lora(
            pipelines,
            training_pairs,
            params,
            tmp_path / "lora.safetensors",
            on_samples=lambda step, samples, received=received: received.append((step, samples)),
        )
        assert [step for step, _ in received] == expected
        last_prompt, last_image = received[-1][1][0]
        assert last_prompt == "a dog" and last_image.size == (64, 64)
