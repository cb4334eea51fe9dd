"""A broker that cannot be reached (issue 26, point 4): a new job's request answers 503 with
Retry-After and leaves no row to run later; a lost run queued again stays queued, for
`redeliver` once the broker is back. On a real Redis client, pointed at a closed port."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django_q.conf import Conf
from rest_framework.test import APIClient

from sessions_app import services as session_services
from tests.helpers import b64, image_bytes
from tests.processes import free_port
from training_app import jobs
from training_app.jobs import BROKER_RETRY_AFTER_S
from training_app.models import Generation, TrainingRun
from training_app.services.runs import TRAINING_RUNS

# Committed for real: the enqueue runs when the request's transaction commits.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broker_down(monkeypatch):
    """django-q2's broker is a Redis on a port nothing listens on."""
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", f"redis://127.0.0.1:{free_port()}/0")


def test_a_new_job_answers_503_with_retry_after_and_leaves_nothing(
    broker_down, generation_worker, training_worker, settings
):
    api = APIClient()
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")

    generation = api.post(
        "/txt2img",
        {"prompt": "a red square", "async": True, "init_image_base64": b64(image_bytes())},
        format="json",
    )
    training = api.post("/train_lora", {"session_id": session.pk, "steps": 1}, format="json")

    for response in (generation, training):
        assert response.status_code == 503, response.content
        assert response["Retry-After"] == str(BROKER_RETRY_AFTER_S)
        assert "nothing was recorded" in response.json()["message"]
    assert not Generation.objects.exists()
    assert not TrainingRun.objects.exists()
    # The starting image written for the generation went with its row.
    assert not any(settings.GENERATIONS_DIR.glob("*"))


def test_a_lost_run_queued_again_stays_queued_for_redelivery(broker_down, settings):
    """The run exists, its client long answered: it waits for the broker, not deleted."""
    session = session_services.session_create()
    lost_beat = timezone.now() - timedelta(seconds=settings.SDXL_RUN_STALE_AFTER + 1)
    run = TrainingRun.objects.create(
        session=session,
        parameters={"steps": 1},
        status=TrainingRun.Status.RUNNING,
        started_at=lost_beat,
        heartbeat_at=lost_beat,
        worker="gone:4242",
    )

    assert jobs.end_lost(TRAINING_RUNS) == [run.pk]

    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.QUEUED
