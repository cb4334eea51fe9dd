"""A run waiting behind another under a real `serve` (issue 25, point 8): the training
worker's cluster takes the waiting run's task out of the broker while the first run
trains, yet /healthz counts it, and its /train_status says where it stands."""

import pytest
import requests
from django.conf import settings
from django_q.brokers import get_broker

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.processes import wait_until
from training_app.models import TrainingRun

pytestmark = pytest.mark.e2e

ENDLESS = {"steps": 100_000, "resolution": 64, "batch_size": 1, "seed": 1}


def _session_id() -> int:
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64)), "red")
    return session.pk


def test_a_run_waiting_behind_a_training_one_is_counted_and_placed(service_processes):
    serve, url = service_processes.serve()
    first_session, second_session = _session_id(), _session_id()
    first = requests.post(
        f"{url}/train_lora", json={"session_id": first_session, **ENDLESS}, timeout=30
    ).json()["run_id"]

    def training() -> bool:
        row = TrainingRun.objects.get(pk=first)
        assert row.status in ("queued", "running"), row.error_message
        return row.step >= 2

    wait_until(training, 180, "the first run's steps")
    second = requests.post(
        f"{url}/train_lora", json={"session_id": second_session, "steps": 5}, timeout=30
    ).json()["run_id"]
    # The worker's cluster takes the task out of the broker though its one job still runs.
    broker = get_broker(settings.TRAINING_QUEUE)
    wait_until(lambda: broker.queue_size() == 0, 30, "the cluster to take the task")
    assert TrainingRun.objects.get(pk=second).status == "queued"

    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert "jobs waiting: 1 training, 0 generation" in health["checks"]["broker"]["reason"]
    status = requests.post(
        f"{url}/train_status", json={"session_id": second_session}, timeout=30
    ).json()
    assert status["queued"] is True
    assert status["queue_position"] == 1
    assert status["waiting_for"] == {"run_id": first}
    assert isinstance(status["queue_eta_seconds"], int)  # the first run's steps left
    print(f"waiting run {second}: {status['queue_eta_seconds']} s estimated")
