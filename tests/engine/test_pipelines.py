from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import generate
from sdxl_engine.generation.pipelines import Pipelines, load_pipelines
from sdxl_engine.source import ModelSource

FAST_FAILURE_SECONDS = 5.0


def test_refiner_shares_text_encoder_2_and_vae(pipelines: Pipelines) -> None:
    assert pipelines.refiner.text_encoder_2 is pipelines.base.text_encoder_2
    assert pipelines.refiner.vae is pipelines.base.vae
    assert pipelines.device == "cpu" and pipelines.dtype == torch.float32
    assert pipelines.base.vae.dtype == torch.float32
    assert pipelines.base.unet.dtype == pipelines.dtype


def test_training_pipelines_hold_the_base_alone(tiny_source: ModelSource) -> None:
    training = load_pipelines(tiny_source, purpose="training")

    assert training.refiner is None
    assert training.base.unet.dtype == training.dtype == torch.float32  # CPU: no half
    with pytest.raises(EngineError, match="purpose='generation'"):
        generate(training, prompt="x", seed=0, height=64, width=64, steps=2)


def test_unknown_purpose_is_an_engine_error(tiny_source: ModelSource) -> None:
    with pytest.raises(EngineError, match="unknown purpose 'inference'"):
        load_pipelines(tiny_source, purpose="inference")


def _load_fails_fast(source: ModelSource, expected_message: str) -> None:
    started = time.monotonic()
    with pytest.raises(EngineError, match=expected_message):
        load_pipelines(source)
    assert time.monotonic() - started < FAST_FAILURE_SECONDS


def test_missing_local_base_folder_is_an_engine_error(
    tiny_source: ModelSource, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    _load_fails_fast(
        replace(tiny_source, base=str(missing)), r"SDXL base model .*no-such-model.*SDXL_BASE_MODEL"
    )


def test_folder_without_a_pipeline_is_an_engine_error(
    tiny_source: ModelSource, tmp_path: Path
) -> None:
    _load_fails_fast(replace(tiny_source, base=str(tmp_path)), "model_index.json")


def test_uncached_hub_model_fails_fast_offline(
    tiny_source: ModelSource, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    source = replace(tiny_source, base="nobody-here/no-such-sdxl-model", preset="hub")
    _load_fails_fast(
        source, r"'nobody-here/no-such-sdxl-model' could not be loaded.*SDXL_MODEL_PRESET=tiny"
    )


def test_missing_refiner_names_its_setting(tiny_source: ModelSource, tmp_path: Path) -> None:
    source = replace(tiny_source, refiner=str(tmp_path / "gone"))
    _load_fails_fast(source, r"SDXL refiner model .*gone.*SDXL_REFINER_MODEL")
