"""Faults with real worker processes (`manage.py worker training`, the tiny model), on the
suite's database and broker: kill -9 mid-run (the restarted worker resumes the run from its
checkpoint), a task delivered twice, a session deleted while it trains. Nothing is lost,
nothing half-written appears, the worker carries on.
"""

from pathlib import Path

import pytest
import torch
from django_q.models import Task
from django_q.tasks import async_task
from safetensors.torch import load_file
from torch.testing import assert_close

from sdxl_engine.training.checkpoints import RESUME_STATE_NAME
from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import ImageGroup, Session, TrainingImage
from tests.helpers import image_bytes
from tests.processes import wait_until
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun
from training_app.services import runs as run_services
from training_app.services.watch import resume_state_dir

pytestmark = pytest.mark.e2e

# Long enough that the run is certainly still training when the test acts on it.
ENDLESS = {"steps": 100_000, "resolution": 64, "batch_size": 1, "seed": 1}
SHORT = {"steps": 2, "resolution": 64, "batch_size": 2, "seed": 1}
# One checkpoint (the last step's file is the LoRA itself), then steps enough that the test
# sees one of them done and kills the worker before the run ends.
STEPS, CHECKPOINT = 40, 20
RESUMABLE = {
    "steps": STEPS,
    "checkpoint_every": CHECKPOINT,
    "resolution": 64,
    "batch_size": 2,
    "seed": 1,
    "sample_every": 0,
}
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


def _past_the_checkpoint(run_id: int) -> bool:
    """A step after the checkpoint is done: the checkpoint and its resume state are saved
    (the engine saves them after the checkpoint's step, before the next step begins)."""
    run = _run(run_id)
    assert run.status in ("queued", "running"), (
        f"the run ended ({run.status}) before its worker could be killed; make RESUMABLE longer"
    )
    if run.step <= CHECKPOINT:
        return False
    assert TrainingCheckpoint.objects.filter(run_id=run_id, step=CHECKPOINT).exists()
    return True


def _uninterrupted_lora(session: Session, parameters: dict, output: Path) -> dict:
    """The LoRA a run of these parameters trains when nothing stops it: trained here, in
    this process, on the tiny model and images the worker used."""
    from django.conf import settings

    from sdxl_engine.dataset import find_training_pairs
    from sdxl_engine.parameters import TrainingParams
    from sdxl_engine.training import train_lora
    from training_app.runtime import worker_pipelines

    train_lora(
        worker_pipelines("training"),
        find_training_pairs(storage.session_dir(session.pk)),
        TrainingParams(**parameters),
        output,
        low_memory={"on": True, "off": False}.get(settings.SDXL_LOW_MEMORY),
    )
    return load_file(output)


def test_kill_9_after_a_checkpoint_and_a_restart_resume_the_run_to_an_uninterrupted_lora(
    service_processes, stale_soon, settings, client, tmp_path
):
    session = _session_with_images()
    worker = service_processes.worker(**stale_soon)
    run = run_services.training_run_start(session.pk, RESUMABLE)
    state = resume_state_dir(session.pk, run.pk) / RESUME_STATE_NAME
    wait_until(
        lambda: _past_the_checkpoint(run.pk), RUN_TIMEOUT_S, "a step past the checkpoint", 0.02
    )

    worker.kill()  # SIGKILL to the worker and its cluster's processes
    killed = _run(run.pk)
    assert killed.status == "running"  # nobody has noticed yet
    assert CHECKPOINT < killed.step <= STEPS
    assert state.is_file()
    # A crash while saving would leave the engine's temporary file; pretend it did (the
    # recovery removes it, and the resumed run must not trip over it).
    leftover = storage.session_dir(session.pk) / f".training-run-{run.pk}.safetensors.tmp"
    leftover.write_bytes(b"half a LoRA")

    # `serve` restarted: its training worker finds the run lost and queues it again.
    replacement = service_processes.worker(**stale_soon)
    # Meanwhile (the run is found lost only once its heartbeat is STALE_AFTER_S old):
    expected = _uninterrupted_lora(session, killed.parameters, tmp_path / "whole.safetensors")
    resumed = wait_until(lambda: _finished(run.pk), RUN_TIMEOUT_S, "the resumed run to end")
    assert resumed.status == "completed", resumed.error_message + replacement.log()
    assert (resumed.resumed_from_step, resumed.attempts) == (CHECKPOINT, 1)
    status = client.post("/train_status", {"session_id": session.pk}, "application/json").json()
    assert {
        key: status.get(key) for key in ("status", "progress", "lora", "resumed_from_step")
    } == {
        "status": "completed",
        "progress": 100,
        "lora": "lora_1.safetensors",
        "resumed_from_step": CHECKPOINT,
    }
    # The checkpoint, then the final LoRA; the loss history runs on over the resume.
    steps = [checkpoint["step"] for checkpoint in status["checkpoints"]]
    assert steps == [CHECKPOINT, resumed.total_steps]
    history = [point["step"] for point in status["loss_history"]]
    assert history == sorted(set(history)) and history[-1] == resumed.total_steps
    # The LoRA, its checkpoint; no resume state, no temporary file.
    assert _session_files(session.pk) == ["0", "1", "checkpoints", "lora_1.safetensors"]
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]

    lora_path = storage.session_dir(session.pk) / "lora_1.safetensors"
    stored = load_file(lora_path)
    assert stored.keys() == expected.keys()
    for key in expected:
        assert_close(stored[key], expected[key], rtol=1e-5, atol=1e-6)
    checkpoint = load_file(
        storage.session_dir(session.pk)
        / "checkpoints"
        / f"lora_run{run.pk}_step{CHECKPOINT}.safetensors"
    )
    assert any(not torch.equal(checkpoint[key], stored[key]) for key in stored)  # it trained on

    # Delivered again (the killed worker's task, retried): the run has ended, nothing runs.
    stored_bytes = lora_path.read_bytes()
    async_task(
        "training_app.tasks.train_lora_task",
        run.pk,
        cluster=settings.TRAINING_QUEUE,
        task_name="redelivery",
    )
    wait_until(lambda: _task_done("redelivery"), RUN_TIMEOUT_S, "the redelivered task")
    assert _run(run.pk).status == "completed" and _run(run.pk).attempts == 1
    assert lora_path.read_bytes() == stored_bytes
    assert LoraArtifact.objects.count() == 1


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
