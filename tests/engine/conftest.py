"""Shared fixtures: the tiny random-weight SDXL pair, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdxl_engine.dataset import TrainingPair, find_training_pairs
from sdxl_engine.generation import warm_up
from sdxl_engine.generation.builder import build_random_pipelines
from sdxl_engine.generation.pipelines import Pipelines, load_pipelines
from sdxl_engine.parameters import TrainingParams
from sdxl_engine.source import ModelSource
from sdxl_engine.training import train_lora


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread() -> Iterator[None]:
    """Run torch on one CPU thread while engine tests run.

    The tiny models gain nothing from intra-op threads, and when another process shares
    the two cores, OpenMP threads waiting on each other make each call many times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def data_dir() -> None:
    """Shadows the autouse `data_dir` of tests/conftest.py for engine tests.

    That one configures Django through pytest-django's `settings` fixture; the engine is
    a plain library, and its tests run without Django (`-p no:django`).
    """


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_random_pipelines("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dirs: tuple[Path, Path]) -> ModelSource:
    base, refiner = tiny_model_dirs
    return ModelSource(
        base=str(base), refiner=str(refiner), preset="tiny", reason="tests", device="cpu"
    )


@pytest.fixture(scope="session")
def pipelines(tiny_source: ModelSource) -> Pipelines:
    return load_pipelines(tiny_source)


@pytest.fixture(scope="session")
def compiled_pipelines(tiny_source: ModelSource) -> Pipelines:
    """The tiny pair as a generation worker with SDXL_COMPILE holds it: both UNets compiled
    whole and warmed up at the native size (on the CPU inductor has no CUDA graphs to
    capture, but compiles and guards the same way)."""
    compiled = load_pipelines(tiny_source, compile_unets=True)
    warm_up(compiled)
    return compiled


def encoded_prompt(pipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt`'s embeddings and pooled embeddings through `pipeline`'s text encoders."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=[prompt],
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
    return embeds, pooled


def make_session_folder(root: Path) -> Path:
    """A session laid out like the service writes it, plus an operator's nested drop-in."""
    images = [
        ("0/0.png", (80, 64), (200, 40, 40), "a red square"),
        ("1/0.jpg", (64, 96), (40, 40, 200), "a tall blue rectangle"),
        ("manual/extra/photo.WEBP", (72, 72), (40, 200, 40), "a green tile"),
    ]
    for relative, size, colour, caption in images:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def training_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[TrainingPair]:
    return find_training_pairs(make_session_folder(tmp_path_factory.mktemp("session")))


# Few steps with a high learning rate, so the LoRA visibly changes the Base's output.
STRONG_LORA_PARAMS = TrainingParams(batch_size=2, steps=4, learning_rate=5e-2, rank=4, seed=7)


@pytest.fixture(scope="session")
def text_encoder_lora(
    pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A LoRA of the UNet and both text encoders, trained like STRONG_LORA_PARAMS."""
    path = tmp_path_factory.mktemp("text-encoder-lora") / "lora.safetensors"
    params = replace(STRONG_LORA_PARAMS, train_text_encoder=True, text_encoder_lr=5e-2)
    train_lora(pipelines, training_pairs, params, path)
    return path


@pytest.fixture(scope="session")
def trained_lora(
    pipelines: Pipelines,
    training_pairs: list[TrainingPair],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    path = tmp_path_factory.mktemp("lora") / "lora_1.safetensors"
    train_lora(pipelines, training_pairs, STRONG_LORA_PARAMS, path)
    return path


@pytest.fixture(scope="session")
def denoiser(tiny_source: ModelSource) -> Pipelines:
    """The tiny model pretrained to denoise quadrant images (tests/engine/denoiser.py), once
    per test session (about 11 s): for tests that prove a training feature learns. Leave it
    as you found it."""
    from .denoiser import SEED, make_denoiser

    return make_denoiser(tiny_source, SEED)
