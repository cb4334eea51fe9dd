"""Faults with real worker processes (`manage.py worker training`, the tiny model), on the
suite's database and broker: kill -9 mid-run, a task delivered twice, a session deleted
while it trains. Nothing is lost, nothing half-written appears, the worker carries on.
"""

import pytest
from django_q.models import Task
from django_q.tasks import async_task

from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import ImageGroup, Session, TrainingImage
from tests.helpers import image_bytes
from tests.processes import wait_until
from training_app.models import LoraArtifact, TrainingRun
from training_app.selectors import training_status
from training_app.services import runs as run_services

pytestmark = pytest.mark.e2e

# Long enough that the run is certainly still training when the test acts on it.
ENDLESS = {"steps": 100_000, "resolution": 64, "batch_size": 1, "seed": 1}
SHORT = {"steps": 2, "resolution": 64, "batch_size": 2, "seed": 1}
STALE_AFTER_S = 5.0
RUN_TIMEOUT_S = 120


@pytest.fixture
def stale_soon(settings) -> dict:
    """Runs count as lost after STALE_AFTER_S, in the test process and in its workers."""
    settings.SDXL_RUN_STALE_AFTER = STALE_AFTER_S
    return {"SDXL_RUN_STALE_AFTER": str(STALE_AFTER_S)}


def _session_with_images() -> Session:
    session = session_services.session_create()
    for color in ("red", "green"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    return session


def _run(run_id: int) -> TrainingRun:
    return TrainingRun.objects.get(pk=run_id)


def _training_steps_done(run_id: int, steps: int) -> bool:
    run = _run(run_id)
    assert run.status in ("queued", "running"), run.error_message
    return run.step >= steps


def _finished(run_id: int) -> TrainingRun | None:
    run = _run(run_id)
    return run if run.status in ("completed", "error") else None


def _task_done(name: str) -> bool:
    return Task.objects.filter(name=name).exists()


def _session_files(session_id: int) -> list[str]:
    return sorted(p.name for p in storage.session_dir(session_id).iterdir())


def test_kill_9_mid_training_ends_the_run_as_lost_and_a_restart_recovers(
    service_processes, stale_soon, settings
):
    session = _session_with_images()
    worker = service_processes.worker(**stale_soon)
    run = run_services.training_run_start(session.pk, ENDLESS)
    wait_until(lambda: _training_steps_done(run.pk, 3), RUN_TIMEOUT_S, "training steps")

    worker.kill()  # SIGKILL to the worker and its cluster's processes
    # A crash while saving would leave the engine's temporary file; pretend it did.
    leftover = storage.session_dir(session.pk) / f".training-run-{run.pk}.safetensors.tmp"
    leftover.write_bytes(b"half a LoRA")
    assert _run(run.pk).status == "running"  # nobody has noticed yet

    replacement = service_processes.worker(**stale_soon)
    lost = wait_until(lambda: _finished(run.pk), 10 * STALE_AFTER_S, "the run to end")
    assert training_status(session.pk) == {
        "status": "error",
        # "the worker running this training was lost..."
        "message": run_services.WORKER_LOST_MESSAGE,
    }
    assert _session_files(session.pk) == ["0", "1"]  # no LoRA, no temporary file
    assert not LoraArtifact.objects.exists()

    # Delivered again (a broker retry): the run is not queued any more, so nothing runs.
    async_task(
        "training_app.tasks.train_lora_task",
        run.pk,
        cluster=settings.TRAINING_QUEUE,
        task_name="redelivery",
    )
    wait_until(lambda: _task_done("redelivery"), RUN_TIMEOUT_S, "the redelivered task")
    assert _run(run.pk).status == "error" and _run(run.pk).step == lost.step

    # The session trains again, on the restarted worker.
    again = run_services.training_run_start(session.pk, SHORT)
    finished = wait_until(lambda: _finished(again.pk), RUN_TIMEOUT_S, "the new run")
    assert finished.status == "completed", finished.error_message + replacement.log()
    assert _session_files(session.pk) == ["0", "1", "lora_1.safetensors"]
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]


def test_task_delivered_twice_to_a_worker_trains_once(service_processes, settings):
    session = _session_with_images()
    service_processes.worker()
    run = run_services.training_run_start(session.pk, SHORT)  # enqueued once on commit
    async_task(
        "training_app.tasks.train_lora_task",
        run.pk,
        cluster=settings.TRAINING_QUEUE,
        task_name="second-delivery",
    )
    wait_until(lambda: _task_done("second-delivery"), RUN_TIMEOUT_S, "the second delivery")
    wait_until(lambda: _task_done(f"training-run-{run.pk}"), RUN_TIMEOUT_S, "the first delivery")

    assert _run(run.pk).status == "completed"
    assert TrainingRun.objects.count() == 1
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]
    assert _session_files(session.pk) == ["0", "1", "lora_1.safetensors"]
    session.refresh_from_db()
    assert session.next_lora_number == 2


def test_delete_session_while_it_trains_stops_the_run_and_nothing_reappears(
    service_processes, client
):
    session = _session_with_images()
    folder = storage.session_dir(session.pk)
    service_processes.worker()
    run = run_services.training_run_start(session.pk, ENDLESS)
    wait_until(lambda: _training_steps_done(run.pk, 3), RUN_TIMEOUT_S, "training steps")

    response = client.post("/delete_session", {"session_id": session.pk}, "application/json")
    assert response.json() == {"status": "deleted", "session_id": str(session.pk)}
    # The job notices at its next step and ends; the worker is free again.
    wait_until(lambda: _task_done(f"training-run-{run.pk}"), 60, "the training job to stop")

    other = _session_with_images()
    next_run = run_services.training_run_start(other.pk, SHORT)
    assert wait_until(lambda: _finished(next_run.pk), RUN_TIMEOUT_S, "the next run").status == (
        "completed"
    )
    assert not folder.exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [f"session_{other.pk}"]
    assert not Session.objects.filter(pk=session.pk).exists()
    assert not TrainingRun.objects.filter(session_id=session.pk).exists()
    assert not ImageGroup.objects.filter(session_id=session.pk).exists()
    assert not TrainingImage.objects.filter(group__session_id=session.pk).exists()
    assert not LoraArtifact.objects.filter(session_id=session.pk).exists()
