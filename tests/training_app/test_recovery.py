"""Runs whose worker died are ended as lost; a live worker's heartbeat keeps its run."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from sdxl_engine.errors import EngineError
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes
from training_app.models import LoraArtifact, TrainingRun
from training_app.services import runs as run_services

pytestmark = pytest.mark.django_db

STALE_AFTER_S = 30.0


@pytest.fixture
def session(settings):
    settings.SDXL_RUN_STALE_AFTER = STALE_AFTER_S
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session


def _running_run(session, beat_seconds_ago: float) -> TrainingRun:
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    beat = timezone.now() - timedelta(seconds=beat_seconds_ago)
    TrainingRun.objects.filter(pk=run.pk).update(
        status="running", stage="training", started_at=beat, heartbeat_at=beat
    )
    return run


def _temporary_files(session, run) -> list:
    folder = storage.session_dir(session.pk)
    names = [f".training-run-{run.pk}.safetensors", f".training-run-{run.pk}.safetensors.tmp"]
    for name in names:
        (folder / name).write_bytes(b"partial")
    return [folder / name for name in names]


def test_a_run_whose_heartbeat_went_stale_ends_as_lost_and_its_files_go(session):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    temporary = _temporary_files(session, run)
    assert run_services.training_runs_recover_lost() == [run.pk]
    run.refresh_from_db()
    assert run.status == "error" and run.error_message == run_services.WORKER_LOST_MESSAGE
    assert run.finished_at is not None
    assert not any(path.exists() for path in temporary)
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == ["0"]
    assert run_services.training_runs_recover_lost() == []  # once


def test_a_run_with_a_fresh_heartbeat_is_left_alone(session):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S - 5)
    temporary = _temporary_files(session, run)
    assert run_services.training_runs_recover_lost() == []
    run.refresh_from_db()
    assert run.status == "running"
    assert all(path.exists() for path in temporary)


@pytest.mark.parametrize("status", ["queued", "completed", "error"])
def test_runs_not_running_are_left_alone(session, status):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S * 10)
    TrainingRun.objects.filter(pk=run.pk).update(status=status)
    assert run_services.training_runs_recover_lost() == []
    assert TrainingRun.objects.get(pk=run.pk).status == status


def test_starting_again_ends_a_lost_run_of_that_session_first(session):
    lost = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    again = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    assert TrainingRun.objects.get(pk=lost.pk).status == "error"
    assert again.status == "queued"


def test_a_live_run_still_blocks_a_second_start(session):
    _running_run(session, beat_seconds_ago=1)
    with pytest.raises(run_services.ServiceError) as error:
        run_services.training_run_start(session.pk, {})
    assert error.value.status == 409


def test_a_lost_run_redelivered_does_nothing(session):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    run_services.training_runs_recover_lost()
    run_services.training_run_execute(run.pk)  # the broker delivers it again
    run.refresh_from_db()
    assert run.status == "error" and run.error_message == run_services.WORKER_LOST_MESSAGE
    assert not LoraArtifact.objects.exists()
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == ["0"]


def test_recover_runs_command(session, capsys):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    call_command("recover_runs")
    assert f"now marked as error: {run.pk}" in capsys.readouterr().out
    call_command("recover_runs")
    assert "no training run has lost its worker" in capsys.readouterr().out


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_thread_keeps_a_slow_job_alive(session, settings, monkeypatch):
    """Loading a model gives no progress callback; the run must not look lost meanwhile.

    Committed rows (transaction=True): the heartbeat thread writes on a connection of its own.
    """
    settings.SDXL_RUN_STALE_AFTER = 1.2  # a beat every 0.3 s
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    seen_by_a_recovering_worker = []

    def slow_model_load(purpose):
        deadline = timezone.now() + timedelta(seconds=3)
        while timezone.now() < deadline:
            seen_by_a_recovering_worker.extend(run_services.training_runs_recover_lost())
        raise EngineError("stopped after loading, for the test")

    monkeypatch.setattr("training_app.runtime.worker_pipelines", slow_model_load)
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert seen_by_a_recovering_worker == []
    assert run.status == "error" and run.error_message == "stopped after loading, for the test"
