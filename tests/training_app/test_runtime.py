import os

import pytest

from sessions_app import services as session_services
from tests.helpers import image_bytes
from training_app import runtime, tasks
from training_app.runtime import worker_pipelines
from training_app.services import runs as run_services

pytestmark = pytest.mark.django_db


def test_pipelines_stay_loaded_between_jobs():
    assert worker_pipelines("generation") is worker_pipelines("generation")
    assert worker_pipelines("training") is worker_pipelines("training")


def test_training_workers_load_the_base_alone_and_generation_workers_both():
    assert worker_pipelines("training").refiner is None
    assert worker_pipelines("generation").refiner is not None


@pytest.mark.parametrize(("queue", "has_refiner"), [("training", False), ("generation", True)])
def test_warm_up_loads_what_the_workers_queue_needs(queue, has_refiner, monkeypatch):
    monkeypatch.setattr(runtime, "_loaded", {})  # nothing loaded yet, as in a new worker

    tasks.warm_up_task(queue)

    assert [pipelines.refiner is not None for pipelines in runtime._loaded.values()] == [
        has_refiner
    ]


def test_other_model_settings_release_the_loaded_pipelines(settings, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(settings.MODEL_CACHE_DIR / "inductor"))
    first = worker_pipelines("training")
    settings.SDXL_COMPILE = True

    assert worker_pipelines("training") is not first
    assert len(runtime._loaded) == 1  # the first is released, not kept beside it


def test_compiled_pipelines_keep_their_compile_cache_with_the_models(settings, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    settings.SDXL_COMPILE = True

    pipelines = worker_pipelines("generation")  # compiles lazily: nothing is compiled yet

    assert pipelines.compiled and not pipelines.warmed_up
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(settings.MODEL_CACHE_DIR / "torch-compile")


def test_missing_real_weights_fail_the_job_with_what_to_set(settings, tmp_path):
    settings.SDXL_MODEL_PRESET = "hub"
    settings.SDXL_BASE_MODEL = str(tmp_path / "no-such-model")
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "x")
    run = run_services.training_run_start(session.pk, {"steps": 1})
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "error"
    assert "SDXL_BASE_MODEL" in run.error_message
