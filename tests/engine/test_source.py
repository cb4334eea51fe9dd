from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.builder import resolve_model_source
from sdxl_engine.source import (
    DEFAULT_BASE_MODEL,
    DEFAULT_REFINER_MODEL,
    WeightsStatus,
    base_unet_configs,
    model_name,
    plan_model_source,
    weights_status,
)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("preset", [None, "", "  auto "])
def test_auto_without_cuda_builds_the_tiny_model(
    no_cuda: None, tmp_path: Path, preset: str | None
) -> None:
    source = resolve_model_source(preset, "", "", tmp_path)

    assert source.preset == "tiny" and source.device == "cpu"
    assert Path(source.base) == tmp_path / "tiny" / "base"
    assert Path(source.refiner) == tmp_path / "tiny" / "refiner"
    assert (Path(source.base) / "model_index.json").is_file()
    assert (Path(source.refiner) / "model_index.json").is_file()
    assert "no CUDA device" in source.reason and "SDXL_MODEL_PRESET=hub" in source.reason


def test_auto_with_cuda_uses_the_hub_models(with_cuda: None, tmp_path: Path) -> None:
    source = resolve_model_source(None, "", "", tmp_path)

    assert (source.preset, source.device) == ("hub", "cuda")
    assert (source.base, source.refiner) == (DEFAULT_BASE_MODEL, DEFAULT_REFINER_MODEL)
    assert source.reason.startswith("CUDA found")
    assert f"SDXL_BASE_MODEL={DEFAULT_BASE_MODEL}" in source.reason
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_hub_preset_keeps_the_given_models(no_cuda: None, tmp_path: Path) -> None:
    source = resolve_model_source("HUB", "/models/base", "me/refiner", tmp_path)

    assert (source.preset, source.base, source.refiner, source.device) == (
        "hub",
        "/models/base",
        "me/refiner",
        "cpu",
    )
    assert "/models/base" in source.reason and "me/refiner" in source.reason


def test_tiny_preset_is_built_once(no_cuda: None, tmp_path: Path) -> None:
    first = resolve_model_source("tiny", "", "", tmp_path)
    weights = Path(first.base) / "unet" / "diffusion_pytorch_model.safetensors"
    built_at = weights.stat().st_mtime_ns

    assert resolve_model_source("tiny", "", "", tmp_path) == first
    assert weights.stat().st_mtime_ns == built_at


def test_unknown_preset_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown SDXL_MODEL_PRESET 'large'.*tiny"):
        resolve_model_source("large", "", "", tmp_path)


def test_plan_names_the_folders_without_building_them(tmp_path: Path) -> None:
    source = plan_model_source("sdxl-random", "", "", tmp_path, cuda=True)

    assert (source.preset, source.device) == ("sdxl-random", "cuda")
    assert Path(source.base) == tmp_path / "sdxl-random" / "base"
    assert list(tmp_path.iterdir()) == []


def test_weights_status_of_local_folders(tmp_path: Path) -> None:
    assert not weights_status(str(tmp_path / "missing")).present
    (tmp_path / "model_index.json").write_text("{}")
    assert weights_status(str(tmp_path)) == WeightsStatus(True, str(tmp_path))


def test_weights_status_of_a_hub_id_reads_the_cache_without_downloading(tmp_path: Path) -> None:
    repo = "someone/sdxl"
    assert not weights_status(repo, hub_cache=tmp_path).present

    snapshot = tmp_path / "models--someone--sdxl" / "snapshots" / ("a" * 40)
    (snapshot / "unet").mkdir(parents=True)
    (tmp_path / "models--someone--sdxl" / "refs").mkdir()
    (tmp_path / "models--someone--sdxl" / "refs" / "main").write_text("a" * 40)
    (snapshot / "model_index.json").write_text("{}")
    assert not weights_status(repo, hub_cache=tmp_path).present  # no UNet weights yet

    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    status = weights_status(repo, hub_cache=tmp_path)
    assert status.present and status.where == str(snapshot)


# --- The Base UNet config the web process checks uploaded LoRAs against ------------------


def _blocks(configs: list[dict]) -> list[list[int]]:
    return [config["block_out_channels"] for config in configs]


TINY, SDXL = [32, 64], [320, 640, 1280]


@pytest.mark.parametrize(
    ("preset", "base", "expected"),
    [
        ("tiny", "", [TINY]),
        ("sdxl-random", "", [SDXL]),
        ("hub", DEFAULT_BASE_MODEL, [SDXL]),  # its published config ships with the engine
        ("hub", "someone/not-in-the-cache", []),  # unknown here: consistency checks only
        ("hub", "/no/such/folder", []),
        ("", DEFAULT_BASE_MODEL, [SDXL, TINY]),  # auto: GPU or not is the worker's to know
    ],
)
def test_base_unet_configs(preset, base, expected) -> None:
    assert _blocks(base_unet_configs(preset, base)) == expected


def test_base_unet_config_of_a_local_folder_is_read_from_it(tiny_model_dirs) -> None:
    base, _ = tiny_model_dirs
    assert _blocks(base_unet_configs("hub", str(base))) == [TINY]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("/srv/sdxl/media/models/my-finetune", "my-finetune"),
        ("/srv/sdxl/media/models/my-finetune/", "my-finetune"),
        ("./models/mine", "mine"),
        ("~/models/mine", "mine"),
        ("C:\\models\\juggernaut-xl", "juggernaut-xl"),
    ],
)
def test_a_models_name_is_its_hub_id_or_its_folders_name_never_a_path(model, name):
    assert model_name(model) == name


def test_a_random_presets_models_are_named_by_the_preset_not_their_folder(tmp_path):
    tiny = plan_model_source("tiny", "", "", tmp_path, cuda=False)
    assert (tiny.base_name, tiny.refiner_name) == ("tiny", "tiny-refiner")
    assert str(tmp_path) in tiny.base  # where it loads from: the server's folder
    hub = plan_model_source("hub", "/data/models/mine", "", tmp_path, cuda=False)
    assert (hub.base_name, hub.refiner_name) == ("mine", DEFAULT_REFINER_MODEL)


def test_the_web_process_plans_the_workers_model_without_torch(monkeypatch) -> None:
    """Issue 25: defaults follow the model a worker on this machine loads, judged without
    importing torch or touching CUDA (source.cuda_likely)."""
    import subprocess
    import sys

    from sdxl_engine import source

    assert (source.planned_native_side("tiny"), source.planned_native_side("hub")) == (64, 1024)
    assert source.planned_native_side("sdxl-random") == 1024
    for cuda, preset, side in ((False, "tiny", 64), (True, "hub", 1024)):
        monkeypatch.setattr(source, "cuda_likely", lambda cuda=cuda: cuda)
        assert source.planned_preset(None) == source.planned_preset("") == preset
        assert source.planned_native_side(None) == side
        assert source.planned_preset("tiny") == "tiny"  # an explicit preset is taken as is
    monkeypatch.undo()
    source.cuda_likely.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert source.cuda_likely() is False
    source.cuda_likely.cache_clear()
    # In a process of its own (this one has torch): planning imports no torch.
    check = (
        "import sys; from sdxl_engine.source import cuda_likely, planned_native_side; "
        "cuda_likely(); planned_native_side(None); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).parents[2])
