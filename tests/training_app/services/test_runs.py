"""training_app.services.runs: starting, executing, watching and cancelling runs."""

import uuid
from dataclasses import asdict
from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.brokers import get_broker
from safetensors import safe_open

from core.errors import ServiceError
from sdxl_engine.files import sha256_file
from sdxl_engine.parameters import TrainingParams
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import FAST_TRAINING, image_bytes, lora_bytes
from training_app import jobs
from training_app.bodies import training_status
from training_app.models import LoraArtifact, TrainingRun
from training_app.services import runs as run_services
from training_app.services.loras import lora_upload

pytestmark = pytest.mark.django_db


def test_start_needs_captioned_images():
    session = session_services.session_create()
    with pytest.raises(ServiceError, match="no images with captions"):
        run_services.training_run_start(session.pk, {})
    assert not TrainingRun.objects.exists()


def test_an_empty_caption_trains_only_with_a_trigger(session_with_images):
    session_services.session_image_add(session_with_images.pk, image_bytes(), "")
    with pytest.raises(ServiceError, match="empty caption: 3/0.png; caption them") as error:
        run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    assert error.value.status == 400
    assert not TrainingRun.objects.exists()

    with_trigger = {**FAST_TRAINING, "trigger": "sks"}
    run = run_services.training_run_start(session_with_images.pk, with_trigger)
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.artifact.metadata["sdxl_service.trigger"] == "sks"


def test_start_refuses_a_parameter_the_engine_does_not_have(session_with_images):
    with pytest.raises(ServiceError, match="unknown training parameters: stepz") as error:
        run_services.training_run_start(session_with_images.pk, {"stepz": 3})
    assert error.value.status == 400
    assert not TrainingRun.objects.exists()


def test_start_records_a_queued_run_and_enqueues_it_on_commit(
    session_with_images, settings, django_capture_on_commit_callbacks
):
    settings.TRAINING_QUEUE = f"test-training-{uuid.uuid4().hex}"  # a queue of its own
    broker = get_broker(settings.TRAINING_QUEUE)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            run = run_services.training_run_start(session_with_images.pk, {"steps": 3})
        assert broker.queue_size() == 1
    finally:
        broker.delete_queue()
    run.refresh_from_db()
    assert (run.status, run.progress) == ("queued", 0)
    # The whole recipe is recorded: steps given, the rest the original's.
    assert run.parameters == asdict(TrainingParams(steps=3, epochs=None, recipe="original"))
    assert run.task_id
    assert training_status(session_with_images.pk) == {
        "status": "in-progress",
        "progress": 0,
        "queued": True,
        "stage": "queued",
        "step": 0,
        "total_steps": None,
        "loss": None,
        "eta_seconds": None,
        # First in the queue, and no training worker beats here.
        "queue_position": 1,
        "waiting_for": {"worker": "training"},
        "queue_eta_seconds": None,
        "samples": [],
        "checkpoints": [],
        "best_checkpoint": None,
        "loss_history": [],
        "resumed_from_step": None,
        "init_lora": None,
    }


def test_second_start_while_active_is_409(session_with_images):
    run_services.training_run_start(session_with_images.pk, {})
    with pytest.raises(ServiceError) as error:
        run_services.training_run_start(session_with_images.pk, {})
    assert error.value.status == 409
    assert TrainingRun.objects.count() == 1


def test_execute_trains_and_stores_lora_1(session_with_images):
    run = run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert (run.status, run.progress, run.step, run.total_steps) == ("completed", 100, 2, 2)
    artifact = LoraArtifact.objects.get()
    assert (artifact.number, artifact.filename, artifact.source) == (
        1,
        "lora_1.safetensors",
        "trained",
    )
    path = storage.session_dir(session_with_images.pk) / "lora_1.safetensors"
    assert artifact.sha256 == sha256_file(path) and artifact.size == path.stat().st_size
    assert artifact.metadata["sdxl_service.rank"] == "4"
    with safe_open(path, framework="pt") as lora:
        assert all(key.startswith("unet.") for key in lora.keys())
    status = training_status(session_with_images.pk)
    # The final LoRA is the run's one scored "checkpoint" (no samples: no similarity).
    assert isinstance(run.eval_loss, float) and run.similarity is None
    final = {"step": 2, "lora_filename": "lora_1.safetensors", "eval_loss": run.eval_loss}
    assert status == {
        "status": "completed",
        "progress": 100,
        "lora": "lora_1.safetensors",
        "samples": [],
        "checkpoints": [{**final, "similarity": None}],
        "best_checkpoint": final,
        "loss_history": [{"step": step, "loss": loss} for step, loss in run.loss_history],
        "resumed_from_step": None,
        "init_lora": None,
    }
    assert [point["step"] for point in status["loss_history"]] == [1, 2]
    assert status["loss_history"][-1]["loss"] == run.last_loss
    assert float(artifact.metadata["sdxl_service.eval_loss"]) == run.eval_loss
    # No temporary file is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["0", "1", "2", "lora_1.safetensors"]


def test_execute_twice_trains_once(session_with_images):
    run = run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    run_services.training_run_execute(run.pk)
    run_services.training_run_execute(run.pk)
    assert LoraArtifact.objects.count() == 1


def test_engine_failure_ends_in_error_without_artifact(session_with_images):
    run = run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    # Captions removed after the run was queued: the engine has nothing to train on.
    for caption in storage.session_dir(session_with_images.pk).glob("*/0.txt"):
        caption.unlink()
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "error" and "no training images" in run.error_message
    assert training_status(session_with_images.pk)["status"] == "error"
    assert not LoraArtifact.objects.exists()
    assert not list(storage.session_dir(session_with_images.pk).glob("*.safetensors*"))
    # Once it has captioned images again, the session can train again.
    (storage.session_dir(session_with_images.pk) / "0" / "0.txt").write_text("red")
    run_services.training_run_start(session_with_images.pk, FAST_TRAINING)


@pytest.fixture
def engine_events(monkeypatch):
    """Runs each function appended to the returned list on every engine callback.

    The worker's own callbacks run first, so a function sees the row as the worker left it.
    """
    import sdxl_engine.training as training

    listeners = []
    real_train_lora = training.train_lora

    def train_lora(*args, on_progress, on_stage, **kwargs):
        def progress(step, total_steps, loss):
            on_progress(step, total_steps, loss)
            for listener in listeners:
                listener(("step", step))

        def stage(name):
            on_stage(name)
            for listener in listeners:
                listener(("stage", name))

        return real_train_lora(*args, on_progress=progress, on_stage=stage, **kwargs)

    monkeypatch.setattr(training, "train_lora", train_lora)
    return listeners


def test_status_shows_each_stage_step_loss_and_eta(
    session_with_images, engine_events, training_worker
):
    seen = []
    engine_events.append(
        lambda event: seen.append((event, training_status(session_with_images.pk)))
    )
    run = run_services.training_run_start(session_with_images.pk, {**FAST_TRAINING, "steps": 3})
    run_services.training_run_execute(run.pk)

    stages = [status["stage"] for event, status in seen if event[0] == "stage"]
    assert stages == ["caching", "training", "saving"]
    steps = [status for event, status in seen if event[0] == "step"]
    assert [status["step"] for status in steps] == [1, 2, 3]
    assert all(status["total_steps"] == 3 and status["loss"] is not None for status in steps)
    assert all(isinstance(status["eta_seconds"], int) for status in steps)
    assert steps[-1]["eta_seconds"] == 0
    caching = next(status for event, status in seen if event == ("stage", "caching"))
    assert caching["eta_seconds"] is None and caching["step"] == 0
    assert training_status(session_with_images.pk)["status"] == "completed"


def test_cancel_of_a_queued_run_means_it_never_runs(session_with_images):
    run = run_services.training_run_start(session_with_images.pk, FAST_TRAINING)
    cancelled = run_services.training_run_cancel(session_with_images.pk)
    assert cancelled.pk == run.pk
    run_services.training_run_execute(run.pk)  # the queued task arrives anyway
    assert training_status(session_with_images.pk) == {
        "status": "cancelled",
        "message": "training was cancelled",
    }
    assert TrainingRun.objects.get().status == "cancelled"
    assert not LoraArtifact.objects.exists()
    # Nothing active any more: the session can train again.
    run_services.training_run_start(session_with_images.pk, FAST_TRAINING)


def test_cancel_of_a_running_run_stops_it_within_one_step(session_with_images, engine_events):
    steps_done = []

    def cancel_after_step_2(event):
        if event[0] == "step":
            steps_done.append(event[1])
        if event == ("step", 2):
            run_services.training_run_cancel(session_with_images.pk)

    engine_events.append(cancel_after_step_2)
    run = run_services.training_run_start(session_with_images.pk, {**FAST_TRAINING, "steps": 20})
    run_services.training_run_execute(run.pk)

    assert steps_done == [1, 2, 3]  # the step under way when it was cancelled, no more
    run.refresh_from_db()
    assert (run.status, run.error_message) == ("cancelled", "training was cancelled")
    assert not LoraArtifact.objects.exists()
    folder = storage.session_dir(session_with_images.pk)
    assert sorted(p.name for p in folder.iterdir()) == ["0", "1", "2"]


def test_cancel_without_an_active_run_is_409_and_unknown_session_404(session_with_images):
    with pytest.raises(ServiceError) as error:
        run_services.training_run_cancel(session_with_images.pk)
    assert error.value.status == 409
    with pytest.raises(ServiceError) as error:
        run_services.training_run_cancel(999_999)
    assert error.value.status == 404


def test_samples_and_checkpoints_are_listed_while_the_run_trains(
    session_with_images, engine_events
):
    seen = []
    engine_events.append(
        lambda event: seen.append((event, training_status(session_with_images.pk)))
    )
    watched = {**FAST_TRAINING, "steps": 4, "sample_every": 2, "checkpoint_every": 2}
    run = run_services.training_run_start(session_with_images.pk, watched)
    run_services.training_run_execute(run.pk)

    at_step_3 = next(status for event, status in seen if event == ("step", 3))
    assert at_step_3["status"] == "in-progress"
    assert {sample["step"] for sample in at_step_3["samples"]} == {2}
    [checkpoint] = at_step_3["checkpoints"]
    assert checkpoint["step"] == 2
    assert checkpoint["lora_filename"] == f"lora_run{run.pk}_step2.safetensors"
    # Scored: the tiny preset's random embedder rates the step's samples (meaninglessly).
    assert isinstance(checkpoint["eval_loss"], float)
    assert -1 <= checkpoint["similarity"] <= 1
    assert [point["step"] for point in at_step_3["loss_history"]] == [1, 2, 3]
    final = training_status(session_with_images.pk)
    assert final["status"] == "completed" and final["resumed_from_step"] is None
    assert [entry["step"] for entry in final["checkpoints"]] == [2, 4]
    assert final["checkpoints"][1]["lora_filename"] == "lora_1.safetensors"
    best = min(final["checkpoints"], key=lambda entry: (entry["eval_loss"], entry["step"]))
    assert final["best_checkpoint"] == {
        key: best[key] for key in ("step", "lora_filename", "eval_loss")
    }
    assert sorted({sample["step"] for sample in final["samples"]}) == [2, 4]
    folder = storage.session_dir(session_with_images.pk)
    assert (folder / "checkpoints" / f"lora_run{run.pk}_step2.safetensors").is_file()
    assert len(list((folder / "samples" / f"run_{run.pk}").glob("*.png"))) == len(final["samples"])
    # The run ended: no state to resume from is left, and the checkpoint took no number.
    assert not (folder / f".resume-run-{run.pk}").exists()
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]


def test_a_live_run_judged_lost_stops_and_leaves_its_requeue_and_state_alone(
    session_with_images, engine_events, settings
):
    """Its heartbeat fell behind (a database locked for a minute, say): recovery queued it
    again. The worker still training it must stop without ending it as cancelled."""
    watched = {**FAST_TRAINING, "steps": 4, "checkpoint_every": 1}
    run = run_services.training_run_start(session_with_images.pk, watched)

    def judged_lost(event):
        if event == ("step", 2):
            TrainingRun.objects.filter(pk=run.pk).update(
                heartbeat_at=timezone.now() - timedelta(seconds=settings.SDXL_RUN_STALE_AFTER + 1)
            )
            assert jobs.end_lost(run_services.TRAINING_RUNS) == [run.pk]

    engine_events.append(judged_lost)
    run_services.training_run_execute(run.pk)

    run.refresh_from_db()
    assert (run.status, run.attempts, run.error_message) == ("queued", 1, "")
    state = storage.session_dir(session_with_images.pk) / f".resume-run-{run.pk}"
    assert (state / "resume.pt").is_file()  # the next attempt resumes from it
    assert not LoraArtifact.objects.exists()


def test_a_run_whose_parent_changed_after_it_was_asked_for_trains_nothing(session_with_images):
    lora_upload(session_with_images.pk, lora_bytes(seed=1), None)
    run = run_services.training_run_start(
        session_with_images.pk, FAST_TRAINING, init_lora={"iteration": 1}
    )
    # Another valid LoRA of the same shape in its place.
    (storage.session_dir(session_with_images.pk) / "lora_1.safetensors").write_bytes(
        lora_bytes(seed=2)
    )
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "error"
    assert "init_lora lora_1.safetensors changed after the run was asked for" in run.error_message
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]
