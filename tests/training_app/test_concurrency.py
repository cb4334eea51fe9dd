"""Concurrent requests on one session: /get_lora never sees a LoRA half-written (the
threads of Django's live server; tests/system/training_app/test_concurrency.py races
/train_lora through real gunicorn processes)."""

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from sdxl_engine.files import replace_with_retry
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import lora_bytes
from training_app.services import loras as lora_services

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
