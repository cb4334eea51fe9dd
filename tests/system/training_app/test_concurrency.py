"""Concurrent /train_lora on one session through two gunicorn processes: one training at a
time."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sessions_app import services as session_services
from tests.helpers import image_bytes
from training_app.models import TrainingRun

SESSIONS = 5


@pytest.mark.e2e
def test_two_concurrent_train_lora_one_starts_the_other_is_409(service_processes):
    url = service_processes.gunicorn(workers=2, threads=4)
    sessions = []
    for _ in range(SESSIONS):
        session = session_services.session_create()
        session_services.session_image_add(session.pk, image_bytes(), "a red square")
        sessions.append(session)

    def race(session) -> list[requests.Response]:
        start = threading.Barrier(2)

        def train(_) -> requests.Response:
            start.wait()
            body = {"session_id": session.pk, "steps": 1}
            return requests.post(f"{url}/train_lora", json=body, timeout=60)

        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(train, range(2)))

    for session in sessions:
        responses = sorted(race(session), key=lambda r: r.status_code)
        assert [r.status_code for r in responses] == [200, 409], [r.text for r in responses]
        assert responses[0].json()["status"] == "started"
        assert responses[1].json() == {
            "status": "error",
            "message": f"session {session.pk} is already training",
        }
        assert TrainingRun.objects.filter(session=session).count() == 1
