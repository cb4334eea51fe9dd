"""Concurrent requests on one session: one training at a time, and /get_lora never sees a
LoRA half-written."""

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sdxl_engine.files import replace_with_retry
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes, lora_bytes
from training_app.models import TrainingRun
from training_app.services import loras as lora_services

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


WRITE_SECONDS = 0.5


def test_get_lora_while_a_new_one_is_written_returns_a_whole_file(live_server, monkeypatch):
    """The new LoRA takes WRITE_SECONDS to reach its place; readers meanwhile get the old one,
    then the new one, each whole (its bytes hash to the sha256 it is served with)."""
    session = session_services.session_create()
    old, new = lora_bytes(seed=1), lora_bytes(seed=2)
    lora_services.lora_upload(session.pk, old, None)
    expected = {"lora_1.safetensors": old, "lora_2.safetensors": new}

    def slow_replace(source, target):
        time.sleep(WRITE_SECONDS)
        replace_with_retry(source, target)

    monkeypatch.setattr(lora_services, "replace_with_retry", slow_replace)
    writing = threading.Thread(target=lora_services.lora_upload, args=(session.pk, new, None))
    served = []

    def read_until_new() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            response = requests.post(
                f"{live_server.url}/get_lora", json={"session_id": session.pk}, timeout=30
            )
            body = response.json()
            served.append((body["lora_filename"], base64.b64decode(body["lora_base64"]), body))
            if body["lora_filename"] == "lora_2.safetensors":
                return

    writing.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: read_until_new(), range(4)))
    writing.join()

    names = {name for name, _, _ in served}
    assert names == {"lora_1.safetensors", "lora_2.safetensors"}
    for name, data, body in served:
        assert data == expected[name]
        assert body["sha256"] == storage.sha256_bytes(data)
