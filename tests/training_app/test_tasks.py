"""A task delivered twice (a broker retry, or enqueued twice) does its work once."""

import threading

import pytest
from django.db import connection

from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import FAST_TRAINING, image_bytes
from training_app import tasks
from training_app.models import Generation, LoraArtifact, TrainingRun
from training_app.services import runs as run_services
from training_app.services.generations.lifecycle import generations_dir
from training_app.services.generations.requests import GenerationRequest, generation_request

SMALL = {"height": 64, "width": 64, "steps": 5, "num_images": 2, "seed": 3}


@pytest.fixture
def session():
    session = session_services.session_create()
    for color in ("red", "blue"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    return session


def _both_at_once(task, row_id: int) -> None:
    """Two deliveries of one task, released together on two threads."""
    start = threading.Barrier(2)
    errors = []

    def deliver():
        try:
            start.wait()
            task(row_id)
        except Exception as error:  # reported below, on the test's thread
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _assert_trained_once(session, run) -> None:
    run.refresh_from_db()
    assert run.status == "completed"
    assert TrainingRun.objects.count() == 1
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_1.safetensors"]
    assert sorted(p.name for p in storage.session_dir(session.pk).iterdir()) == [
        "0",
        "1",
        "lora_1.safetensors",
    ]
    session.refresh_from_db()
    assert session.next_lora_number == 2


def _assert_generated_once(generation: Generation, started_at=None) -> None:
    generation.refresh_from_db()
    assert generation.status == "completed" and generation.image_count == 2
    assert started_at is None or generation.started_at == started_at
    assert sorted(p.name for p in generations_dir(generation.pk).iterdir()) == ["0.png", "1.png"]
    assert Generation.objects.count() == 1


@pytest.mark.django_db
def test_training_task_run_twice_trains_once(session):
    run = run_services.training_run_start(session.pk, FAST_TRAINING)
    tasks.train_lora_task(run.pk)
    first = LoraArtifact.objects.get()
    tasks.train_lora_task(run.pk)
    _assert_trained_once(session, run)
    assert LoraArtifact.objects.get().sha256 == first.sha256


@pytest.mark.django_db(transaction=True)
def test_training_task_delivered_twice_at_once_trains_once(session):
    run = run_services.training_run_start(session.pk, FAST_TRAINING)
    _both_at_once(tasks.train_lora_task, run.pk)
    _assert_trained_once(session, run)


@pytest.mark.django_db
def test_generation_task_run_twice_generates_once(generation_worker):
    generation = generation_request(GenerationRequest(prompt="a cat", **SMALL))
    tasks.generate_task(generation.pk)
    generation.refresh_from_db()
    started_at = generation.started_at
    pngs = [p.read_bytes() for p in sorted(generations_dir(generation.pk).iterdir())]
    tasks.generate_task(generation.pk)
    _assert_generated_once(generation, started_at)
    assert [p.read_bytes() for p in sorted(generations_dir(generation.pk).iterdir())] == pngs


@pytest.mark.django_db(transaction=True)
def test_generation_task_delivered_twice_at_once_generates_once(generation_worker):
    generation = generation_request(GenerationRequest(prompt="a cat", **SMALL))
    _both_at_once(tasks.generate_task, generation.pk)
    _assert_generated_once(generation)


def test_a_task_is_attempted_once_by_the_broker(settings):
    """A job that kills its worker is not handed out again and again: django-q2 gives each
    task one attempt, and the claim turns any redelivery into a no-op (tests above)."""
    assert settings.Q_CLUSTER["max_attempts"] == 1
    assert settings.Q_CLUSTER["retry"] > settings.Q_CLUSTER["timeout"]
