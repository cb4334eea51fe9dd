"""Jobs whose task a dying worker took with it are queued again; nothing else is.

Runs on the broker the pass configures: the ORM broker on SQLite, Redis on PostgreSQL.
"""

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.brokers import get_broker

from sessions_app import services as session_services
from tests.helpers import image_bytes
from training_app import jobs
from training_app.models import Generation, TrainingRun
from training_app.services import runs as run_services
from training_app.services.generations.lifecycle import GENERATIONS
from training_app.services.generations.requests import GenerationRequest, generation_request
from training_app.services.runs import TRAINING_RUNS

pytestmark = pytest.mark.django_db

WAITED_S = 30.0


@pytest.fixture
def broker(settings, queue_namespace):
    settings.SDXL_RUN_STALE_AFTER = WAITED_S
    return get_broker(settings.TRAINING_QUEUE)


def _session():
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session


def _queued_run(django_capture_on_commit_callbacks, waited_s: float) -> TrainingRun:
    with django_capture_on_commit_callbacks(execute=True):
        run = run_services.training_run_start(_session().pk, {"steps": 1})
    TrainingRun.objects.filter(pk=run.pk).update(
        created_at=timezone.now() - timedelta(seconds=waited_s)
    )
    run.refresh_from_db()
    return run


def _lose_the_task(broker) -> None:
    """What a worker does before it dies: takes the task out of the broker."""
    assert broker.queue_size() == 1
    assert broker.dequeue()
    assert broker.queue_size() == 0


def test_a_run_whose_task_was_lost_is_queued_again(broker, django_capture_on_commit_callbacks):
    run = _queued_run(django_capture_on_commit_callbacks, WAITED_S + 1)
    _lose_the_task(broker)

    assert jobs.redeliver(TRAINING_RUNS) == [run.pk]

    assert broker.queue_size() == 1
    run_after = TrainingRun.objects.get(pk=run.pk)
    assert run_after.status == "queued" and run_after.task_id != run.task_id
    # Its task is in the broker again: nothing more to do on the next beat.
    assert jobs.redeliver(TRAINING_RUNS) == []
    assert broker.queue_size() == 1


def test_a_run_whose_task_waits_in_the_broker_is_left_alone(
    broker, django_capture_on_commit_callbacks
):
    run = _queued_run(django_capture_on_commit_callbacks, WAITED_S + 1)

    assert jobs.redeliver(TRAINING_RUNS) == []
    assert broker.queue_size() == 1
    assert TrainingRun.objects.get(pk=run.pk).task_id == run.task_id


def test_a_run_that_just_queued_is_left_alone(broker, django_capture_on_commit_callbacks):
    _queued_run(django_capture_on_commit_callbacks, WAITED_S - 5)
    _lose_the_task(broker)

    assert jobs.redeliver(TRAINING_RUNS) == []
    assert broker.queue_size() == 0


def test_nothing_is_queued_again_while_a_run_is_running(broker, django_capture_on_commit_callbacks):
    """A worker busy with one run may hold the next task in memory, out of the broker."""
    _queued_run(django_capture_on_commit_callbacks, WAITED_S + 1)
    _lose_the_task(broker)
    running = _queued_run(django_capture_on_commit_callbacks, 0)
    broker.dequeue()
    TrainingRun.objects.filter(pk=running.pk).update(status="running", started_at=timezone.now())

    assert jobs.redeliver(TRAINING_RUNS) == []
    assert broker.queue_size() == 0


def test_a_run_running_past_the_job_timeout_does_not_block_the_queue(
    broker, settings, django_capture_on_commit_callbacks
):
    lost = _queued_run(django_capture_on_commit_callbacks, WAITED_S + 1)
    _lose_the_task(broker)
    killed = _queued_run(django_capture_on_commit_callbacks, 0)
    broker.dequeue()
    long_ago = timezone.now() - timedelta(seconds=settings.SDXL_TRAINING_TIMEOUT + 1)
    TrainingRun.objects.filter(pk=killed.pk).update(status="running", started_at=long_ago)

    assert jobs.redeliver(TRAINING_RUNS) == [lost.pk]


def test_a_generation_whose_task_was_lost_is_queued_again(
    settings, queue_namespace, generation_worker, django_capture_on_commit_callbacks
):
    broker = get_broker(settings.GENERATION_QUEUE)
    with django_capture_on_commit_callbacks(execute=True):
        generation = generation_request(GenerationRequest(prompt="a red square"))
    Generation.objects.filter(pk=generation.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.SDXL_WORKER_STALE_AFTER + 1)
    )
    _lose_the_task(broker)

    assert jobs.redeliver(GENERATIONS) == [generation.pk]
    assert broker.queue_size() == 1
