"""Where a queued job stands (issue 25, point 8): queue_position, waiting_for and
queue_eta_seconds on /train_status, GET /sessions/<id>'s runs, /txt2img's 202 answer and
GET /generations/<id>; and /healthz and `doctor` counting the jobs that wait."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.brokers import get_broker
from rest_framework.test import APIClient

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.maintenance_helpers import run as run_command
from training_app.models import Generation, TrainingRun, WorkerHeartbeat

pytestmark = pytest.mark.django_db

SMALL = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5}


def _session_id() -> int:
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session.pk


def _train(api: APIClient, steps: int) -> int:
    response = api.post("/train_lora", {"session_id": _session_id(), "steps": steps}, format="json")
    assert response.status_code == 200, response.content
    return int(response.json()["run_id"])


def _training(run_id: int, step: int, total_steps: int, seconds_per_step: float) -> None:
    """The run as a worker training it writes it: `step` steps done at that pace."""
    now = timezone.now()
    TrainingRun.objects.filter(pk=run_id).update(
        status=TrainingRun.Status.RUNNING,
        stage=TrainingRun.Stage.TRAINING,
        started_at=now - timedelta(seconds=step * seconds_per_step + 5),
        training_started_at=now - timedelta(seconds=step * seconds_per_step),
        heartbeat_at=now,
        step=step,
        total_steps=total_steps,
        worker="gpu-box:1",
    )


def test_queued_runs_show_their_place_what_they_wait_for_and_when(api, training_worker):
    running = _train(api, steps=100)
    first, second = _train(api, steps=50), _train(api, steps=30)
    _training(running, step=10, total_steps=100, seconds_per_step=1.0)

    def status(run_id: int) -> dict:
        session_id = TrainingRun.objects.get(pk=run_id).session_id
        response = api.post("/train_status", {"session_id": session_id}, format="json")
        assert response.status_code == 200
        return response.json()

    training = status(running)
    assert training["queued"] is False
    assert (training["queue_position"], training["waiting_for"]) == (None, None)
    assert training["queue_eta_seconds"] is None

    next_one = status(first)
    assert next_one["queued"] is True
    assert next_one["queue_position"] == 1
    assert next_one["waiting_for"] == {"run_id": running}
    # 90 steps left at 1 s a step.
    assert 85 <= next_one["queue_eta_seconds"] <= 90

    behind = status(second)
    assert behind["queue_position"] == 2
    assert behind["waiting_for"] == {"run_id": first}
    # ...then the 50 steps of the run ahead, at the running run's pace.
    assert 135 <= behind["queue_eta_seconds"] <= 140

    # The session's detail lists the same place for its queued run.
    session_id = TrainingRun.objects.get(pk=second).session_id
    detail = api.get(f"/sessions/{session_id}").json()
    (listed,) = detail["runs"]
    assert listed["run_id"] == second
    assert listed["queue_position"] == 2
    assert listed["waiting_for"] == {"run_id": first}
    assert 135 <= listed["queue_eta_seconds"] <= 140

    # The run ahead ends: the next one is taken now, the one behind it still waits for it.
    TrainingRun.objects.filter(pk=running).update(
        status=TrainingRun.Status.COMPLETED, finished_at=timezone.now()
    )
    assert {key: status(first)[key] for key in ("queue_position", "waiting_for")} == {
        "queue_position": 1,
        "waiting_for": None,
    }
    assert status(first)["queue_eta_seconds"] == 0
    assert status(second)["waiting_for"] == {"run_id": first}


def test_a_queued_run_with_no_training_worker_waits_for_one_and_has_no_eta(api):
    run_id = _train(api, steps=5)
    session_id = TrainingRun.objects.get(pk=run_id).session_id
    body = api.post("/train_status", {"session_id": session_id}, format="json").json()
    assert body["queue_position"] == 1
    assert body["waiting_for"] == {"worker": "training"}
    assert body["queue_eta_seconds"] is None


def test_queued_generations_show_their_place(api, generation_worker):
    first = api.post("/txt2img", {**SMALL, "async": True}, format="json")
    assert first.status_code == 202
    first_id = first.json()["generation_id"]
    # Nothing ahead, a worker alive: it is taken now.
    assert first.json()["queue_position"] == 1
    assert first.json()["waiting_for"] is None
    assert first.json()["queue_eta_seconds"] == 0

    second = api.post("/txt2img", {**SMALL, "async": True, "num_images": 2}, format="json")
    second_id = second.json()["generation_id"]
    assert second.json()["queue_position"] == 2
    assert second.json()["waiting_for"] == {"generation_id": first_id}
    # No generation finished yet: no pace to estimate from.
    assert second.json()["queue_eta_seconds"] is None

    # A finished generation gives the pace (2 s an image); the first one runs, half done.
    done = Generation.objects.get(pk=first_id)
    done.pk = None
    done.status, done.duration_ms, done.image_count = Generation.Status.COMPLETED, 4000, 2
    done.finished_at = timezone.now()
    done.save()
    Generation.objects.filter(pk=first_id).update(
        status=Generation.Status.RUNNING,
        started_at=timezone.now(),
        step=5,
        total_steps=10,
        worker="gpu-box:2",
    )
    third = api.post("/txt2img", {**SMALL, "async": True}, format="json").json()

    status = api.get(f"/generations/{second_id}").json()
    assert status["status"] == "queued"
    assert status["queue_position"] == 1
    assert status["waiting_for"] == {"generation_id": first_id, "batch": [first_id]}
    assert status["queue_eta_seconds"] == 1  # half of one image at 2 s an image
    assert third["queue_position"] == 2
    assert third["waiting_for"] == {"generation_id": second_id}
    assert third["queue_eta_seconds"] == 5  # ...then the 2 images of the one ahead

    running = api.get(f"/generations/{first_id}").json()
    assert running["status"] == "running"
    assert (running["queue_position"], running["waiting_for"]) == (None, None)


@pytest.mark.parametrize("taken_by_a_worker", [False, True], ids=["in-broker", "taken"])
def test_healthz_and_doctor_count_a_waiting_run(
    api, settings, queue_namespace, django_capture_on_commit_callbacks, taken_by_a_worker
):
    """No training worker beats; the run's task is in the broker, or a worker's cluster
    already took it out of the broker (its pusher does so while the one job before it
    runs): either way the run waits, and both count it."""
    with django_capture_on_commit_callbacks(execute=True):
        _train(api, steps=5)
    if taken_by_a_worker:
        assert get_broker(settings.TRAINING_QUEUE).dequeue()

    health = api.get("/healthz").json()
    assert "jobs waiting: 1 training, 0 generation" in health["checks"]["broker"]["reason"]
    assert health["checks"]["training_worker"]["ok"] is False

    output = run_command("doctor")
    assert f"broker {settings.TRAINING_QUEUE}: " in output
    assert "jobs waiting: 1 training" in output
    assert "jobs waiting: 0 generation" in output


def test_with_two_training_workers_the_next_run_waits_for_the_one_ending_first(
    api, settings, training_worker
):
    WorkerHeartbeat.objects.create(
        queue=settings.TRAINING_QUEUE,
        host="gpu-box",
        pid=2,
        started_at=timezone.now(),
        last_seen=timezone.now(),
    )
    long_run, short_run = _train(api, steps=100), _train(api, steps=100)
    waiting = _train(api, steps=20)
    _training(long_run, step=10, total_steps=100, seconds_per_step=1.0)  # 90 s left
    _training(short_run, step=90, total_steps=100, seconds_per_step=1.0)  # 10 s left

    session_id = TrainingRun.objects.get(pk=waiting).session_id
    body = api.post("/train_status", {"session_id": session_id}, format="json").json()
    assert body["queue_position"] == 1
    assert body["waiting_for"] == {"run_id": short_run}
    # The worker of the run ending first takes it.
    assert 5 <= body["queue_eta_seconds"] <= 10
