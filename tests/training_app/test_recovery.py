"""Runs whose worker died are queued again to resume, up to SDXL_TRAINING_MAX_RESUMES
times, then ended as lost; a live worker's heartbeat keeps its run; a cancelled run stays
ended."""

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_q.brokers import get_broker
from safetensors.torch import load_file
from torch.testing import assert_close

from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.training.checkpoints import RESUME_STATE_NAME
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes
from training_app import jobs
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun
from training_app.services import runs as run_services
from training_app.services.watch import checkpoint_store, resume_state_dir

pytestmark = pytest.mark.django_db

STALE_AFTER_S = 30.0


@pytest.fixture
def session(settings):
    settings.SDXL_RUN_STALE_AFTER = STALE_AFTER_S
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session


@pytest.fixture
def broker(settings, queue_namespace):
    """The training queue, of this test's own: what a recovery enqueued lands here."""
    return get_broker(settings.TRAINING_QUEUE)


def _running_run(session, beat_seconds_ago: float) -> TrainingRun:
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    _lose(run, beat_seconds_ago)
    return run


def _lose(run: TrainingRun, beat_seconds_ago: float, step: int = 5, progress: int = 50) -> None:
    """The run as a worker left it: running, its last heartbeat that long ago."""
    beat = timezone.now() - timedelta(seconds=beat_seconds_ago)
    TrainingRun.objects.filter(pk=run.pk).update(
        status="running",
        stage="training",
        started_at=beat,
        heartbeat_at=beat,
        worker="gone:4242",
        step=step,
        progress=progress,
    )


def _temporary_files(session, run) -> list[Path]:
    folder = storage.session_dir(session.pk)
    names = [f".training-run-{run.pk}.safetensors", f".training-run-{run.pk}.safetensors.tmp"]
    for name in names:
        (folder / name).write_bytes(b"partial")
    return [folder / name for name in names]


def _resume_state(session, run) -> Path:
    """A state the run's last checkpoint saved (its bytes do not matter here)."""
    folder = resume_state_dir(session.pk, run.pk)
    folder.mkdir()
    (folder / RESUME_STATE_NAME).write_bytes(b"a saved state")
    return folder


def _lost_message(resumes: int) -> str:
    return (
        f"{run_services.WORKER_LOST_MESSAGE} (the run was resumed {resumes} times, "
        "the most SDXL_TRAINING_MAX_RESUMES allows)"
    )


def test_a_run_whose_heartbeat_went_stale_is_queued_again_to_resume(
    session, broker, django_capture_on_commit_callbacks
):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    temporary = _temporary_files(session, run)
    state = _resume_state(session, run)

    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]

    assert len(enqueued) == 1 and broker.queue_size() == 1
    run.refresh_from_db()
    assert (run.status, run.stage, run.attempts) == ("queued", "queued", 1)
    assert run.worker == "" and run.heartbeat_at is None and run.task_id
    assert run.error_message == "" and run.finished_at is None
    assert (run.step, run.progress) == (5, 50)  # progress never goes backwards
    assert not any(path.exists() for path in temporary)
    # What the next attempt resumes from stays.
    assert (state / RESUME_STATE_NAME).read_bytes() == b"a saved state"
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == [
        f".resume-run-{run.pk}",
        "0",
    ]
    with django_capture_on_commit_callbacks(execute=True) as enqueued_again:
        assert jobs.end_lost(run_services.TRAINING_RUNS) == []  # once
    assert enqueued_again == [] and broker.queue_size() == 1


def test_a_run_lost_more_often_than_max_resumes_ends_as_lost_and_its_state_goes(
    session, settings, broker, django_capture_on_commit_callbacks
):
    settings.SDXL_TRAINING_MAX_RESUMES = 2
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    state = _resume_state(session, run)
    for attempt in (1, 2):
        with django_capture_on_commit_callbacks(execute=True):
            assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]
        assert TrainingRun.objects.get(pk=run.pk).status == "queued"
        assert TrainingRun.objects.get(pk=run.pk).attempts == attempt
        _lose(run, beat_seconds_ago=STALE_AFTER_S + 1)  # the resumed attempt is lost too
    temporary = _temporary_files(session, run)

    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]

    assert enqueued == [] and broker.queue_size() == 2  # the two resumes only
    run.refresh_from_db()
    assert run.status == "error" and run.attempts == 2
    assert run.error_message == _lost_message(2)
    assert run.finished_at is not None
    assert not state.exists()
    assert not any(path.exists() for path in temporary)
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == ["0"]
    assert jobs.end_lost(run_services.TRAINING_RUNS) == []  # once


def test_with_no_resumes_allowed_a_lost_run_ends_at_once(
    session, settings, broker, django_capture_on_commit_callbacks
):
    settings.SDXL_TRAINING_MAX_RESUMES = 0
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    state = _resume_state(session, run)
    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]
    assert enqueued == [] and broker.queue_size() == 0
    run.refresh_from_db()
    assert (run.status, run.attempts, run.error_message) == ("error", 0, _lost_message(0))
    assert not state.exists()


def test_a_run_with_a_fresh_heartbeat_is_left_alone(session):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S - 5)
    temporary = _temporary_files(session, run)
    state = _resume_state(session, run)
    assert jobs.end_lost(run_services.TRAINING_RUNS) == []
    run.refresh_from_db()
    assert run.status == "running" and run.attempts == 0
    assert all(path.exists() for path in temporary)
    assert state.exists()


@pytest.mark.parametrize("status", ["queued", "completed", "error"])
def test_runs_not_running_are_left_alone(session, status):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S * 10)
    TrainingRun.objects.filter(pk=run.pk).update(status=status)
    assert jobs.end_lost(run_services.TRAINING_RUNS) == []
    assert TrainingRun.objects.get(pk=run.pk).status == status


def test_a_cancelled_run_is_never_queued_again(session, broker, django_capture_on_commit_callbacks):
    run = _running_run(session, beat_seconds_ago=1)
    run_services.training_run_cancel(session.pk)
    # Its worker dies before it notices: the heartbeat goes stale.
    TrainingRun.objects.filter(pk=run.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=STALE_AFTER_S + 1)
    )

    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        assert jobs.end_lost(run_services.TRAINING_RUNS) == []

    assert enqueued == [] and broker.queue_size() == 0
    run.refresh_from_db()
    assert (run.status, run.error_message) == ("cancelled", run_services.CANCELLED_MESSAGE)
    assert run.attempts == 0


def test_cancelling_a_run_queued_again_ends_it_for_good_and_removes_its_state(
    session, settings, django_capture_on_commit_callbacks
):
    settings.SDXL_RUN_STALE_AFTER = 3600.0  # no heartbeat thread beats in this test
    run = _running_run(session, beat_seconds_ago=2 * 3600)
    state = _resume_state(session, run)
    assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]

    cancelled = run_services.training_run_cancel(session.pk)

    assert cancelled.pk == run.pk and cancelled.status == "cancelled"
    assert cancelled.error_message == run_services.CANCELLED_MESSAGE
    assert not state.exists()
    run_services.training_run_execute(run.pk)  # its task is delivered: nothing runs
    run.refresh_from_db()
    assert (run.status, run.error_message) == ("cancelled", run_services.CANCELLED_MESSAGE)
    assert not LoraArtifact.objects.exists()
    assert jobs.end_lost(run_services.TRAINING_RUNS) == []


def test_starting_again_while_a_run_is_lost_answers_409_and_the_lost_run_resumes(
    session, broker, django_capture_on_commit_callbacks
):
    lost = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        with pytest.raises(run_services.ServiceError) as error:
            run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    assert error.value.status == 409
    assert error.value.message == f"session {session.pk} is already training"
    # The start queued the lost run again, and that stays although the start failed.
    lost.refresh_from_db()
    assert (lost.status, lost.attempts) == ("queued", 1)
    assert len(enqueued) == 1 and broker.queue_size() == 1
    assert TrainingRun.objects.count() == 1


def test_starting_again_after_a_run_was_lost_for_good_starts_a_new_run(session, settings):
    settings.SDXL_TRAINING_MAX_RESUMES = 1
    lost = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    TrainingRun.objects.filter(pk=lost.pk).update(attempts=1)
    again = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    lost.refresh_from_db()
    assert lost.status == "error" and lost.error_message == _lost_message(1)
    assert again.status == "queued" and again.pk != lost.pk


def test_a_live_run_still_blocks_a_second_start(session):
    _running_run(session, beat_seconds_ago=1)
    with pytest.raises(run_services.ServiceError) as error:
        run_services.training_run_start(session.pk, {})
    assert error.value.status == 409


def test_a_run_ended_as_lost_and_delivered_again_does_nothing(session, settings):
    settings.SDXL_TRAINING_MAX_RESUMES = 0
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    jobs.end_lost(run_services.TRAINING_RUNS)
    run_services.training_run_execute(run.pk)  # the broker delivers it again
    run.refresh_from_db()
    assert run.status == "error" and run.error_message == _lost_message(0)
    assert not LoraArtifact.objects.exists()
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == ["0"]


def test_a_run_queued_again_resumes_from_its_checkpoint(session, settings, tmp_path):
    """In-process, the worker's part: the next delivery of a run queued again continues from
    the state its lost attempt saved, and ends with the LoRA of an uninterrupted run.
    (tests/system/training_app/test_worker_faults.py does it with a real worker killed -9.)"""
    from sdxl_engine.dataset import find_training_pairs
    from sdxl_engine.parameters import TrainingParams
    from sdxl_engine.training import train_lora
    from training_app.runtime import worker_pipelines

    settings.SDXL_RUN_STALE_AFTER = 3600.0  # no heartbeat thread beats in this test
    run = run_services.training_run_start(
        session.pk,
        {"steps": 4, "checkpoint_every": 2, "resolution": 64, "batch_size": 1, "seed": 3},
    )
    params = TrainingParams(**run.parameters)
    pipelines = worker_pipelines("training")
    pairs = find_training_pairs(storage.session_dir(session.pk))
    state = resume_state_dir(session.pk, run.pk)
    # The first attempt: its worker is lost after step 3, past the checkpoint of step 2.
    steps_done: list[int] = []
    with pytest.raises(TrainingCancelled):
        train_lora(
            pipelines,
            pairs,
            params,
            tmp_path / "never.safetensors",
            state_dir=state,
            on_progress=lambda step, total, loss: steps_done.append(step),
            should_stop=lambda: len(steps_done) >= 3,
            on_checkpoint=lambda step, path, sha256: checkpoint_store(run, step, path, sha256),
        )
    _lose(run, beat_seconds_ago=2 * 3600, step=3, progress=75)
    assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]
    assert (state / RESUME_STATE_NAME).is_file()

    run_services.training_run_execute(run.pk)  # the run's task, delivered again

    run.refresh_from_db()
    assert run.status == "completed", run.error_message
    assert (run.resumed_from_step, run.attempts, run.step, run.progress) == (2, 1, 4, 100)
    assert not state.exists()  # the run ended: nothing will resume it
    assert list(TrainingCheckpoint.objects.values_list("step", flat=True)) == [2]
    train_lora(pipelines, pairs, params, tmp_path / "whole.safetensors")
    artifact = LoraArtifact.objects.get(training_run=run)
    expected = load_file(tmp_path / "whole.safetensors")
    resumed = load_file(storage.session_dir(session.pk) / artifact.filename)
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)


def test_recover_runs_command(session, capsys):
    run = _running_run(session, beat_seconds_ago=STALE_AFTER_S + 1)
    call_command("recover_runs")
    assert "1 training run(s) lost their worker, queued again to resume" in (
        capsys.readouterr().out
    )
    run.refresh_from_db()
    assert (run.status, run.attempts) == ("queued", 1)
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
            seen_by_a_recovering_worker.extend(jobs.end_lost(run_services.TRAINING_RUNS))
        raise EngineError("stopped after loading, for the test")

    monkeypatch.setattr("training_app.runtime.worker_pipelines", slow_model_load)
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert seen_by_a_recovering_worker == []
    assert run.status == "error" and run.error_message == "stopped after loading, for the test"
