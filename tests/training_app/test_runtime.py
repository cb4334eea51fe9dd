import os

import pytest

from sessions_app import services as session_services
from tests.helpers import image_bytes
from training_app import services
from training_app.runtime import worker_pipelines

pytestmark = pytest.mark.django_db


def test_pipelines_stay_loaded_between_jobs():
    assert worker_pipelines() is worker_pipelines()


def test_compiled_pipelines_keep_their_compile_cache_with_the_models(settings, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    settings.SDXL_COMPILE = True

    pipelines = worker_pipelines()  # compiles lazily: nothing is compiled yet

    assert pipelines.compiled and not pipelines.warmed_up
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(settings.MODEL_CACHE_DIR / "torch-compile")


def test_missing_real_weights_fail_the_job_with_what_to_set(settings, tmp_path):
    settings.SDXL_MODEL_PRESET = "hub"
    settings.SDXL_BASE_MODEL = str(tmp_path / "no-such-model")
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "x")
    run = services.training_run_start(session.pk, {"steps": 1})
    services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "error"
    assert "SDXL_BASE_MODEL" in run.error_message
