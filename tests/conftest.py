"""Shared fixtures: an isolated data dir per test, one tiny model build per test run."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """The tiny random-weight SDXL pair is written once per test run, here."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path, model_cache_dir) -> Path:
    """Every test gets its own empty data dir; nothing touches ./media."""
    root = tmp_path / "data"
    root.mkdir()
    settings.DATA_DIR = root
    settings.SESSION_DATA_DIR = root / "session_data"
    settings.GENERATIONS_DIR = root / "generations"
    settings.MODEL_CACHE_DIR = model_cache_dir
    settings.SDXL_MODEL_PRESET = "tiny"
    return root
