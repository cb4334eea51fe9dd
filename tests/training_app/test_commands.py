import pytest
from django.core.management.base import CommandError
from django.utils import timezone

from tests.maintenance_helpers import run
from training_app.models import WorkerHeartbeat

pytestmark = pytest.mark.django_db


def test_doctor_reports_every_check_and_passes_on_the_tiny_model(settings):
    WorkerHeartbeat.objects.create(
        queue=settings.TRAINING_QUEUE,
        host="gpu-box",
        pid=42,
        started_at=timezone.now(),
        last_seen=timezone.now(),
    )

    output = run("doctor")

    for name in ("gpu", "models", "base weights", "refiner weights", "database", "data dir"):
        assert f"] {name}: " in output, name
    assert f"] broker {settings.TRAINING_QUEUE}: " in output
    assert "training workers: 1 alive: gpu-box:42" in output
    assert "generation workers: none alive" in output
    assert "none failed" in output


def test_doctor_fails_when_the_configured_weights_are_missing(settings, tmp_path):
    settings.SDXL_MODEL_PRESET = "hub"
    settings.SDXL_BASE_MODEL = str(tmp_path / "no-such-model")
    with pytest.raises(CommandError, match="base weights"):
        run("doctor")


def test_doctor_fails_on_an_unknown_preset(settings):
    settings.SDXL_MODEL_PRESET = "large"
    with pytest.raises(CommandError, match="models"):
        run("doctor")


def test_build_model_writes_the_tiny_pair_and_keeps_it(tmp_path):
    output = run("build_model", "--preset", "tiny", "--out", str(tmp_path / "tiny"))

    base, refiner = tmp_path / "tiny" / "base", tmp_path / "tiny" / "refiner"
    assert f"tiny: base {base}" in output and f"tiny: refiner {refiner}" in output
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    built = weights.stat().st_mtime_ns
    run("build_model", "--preset", "tiny", "--out", str(tmp_path / "tiny"))
    assert weights.stat().st_mtime_ns == built
    assert (refiner / "model_index.json").is_file()


def test_build_model_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(CommandError, match="no CUDA GPU"):
        run("build_model", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
