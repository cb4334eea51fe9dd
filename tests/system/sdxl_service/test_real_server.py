"""Access and body limits hold on the real web server (gunicorn, as `serve` runs it), not
only through Django's test client."""

import json

import pytest
import requests

from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import ImageGroup, Session
from tests.helpers import b64, image_bytes
from tests.processes import process_tree, still_running, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "real-server-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1024 * 1024  # SDXL_MAX_BODY_MB=1


@pytest.fixture
def server(service_processes) -> str:
    return service_processes.gunicorn(
        workers=1, threads=4, SDXL_API_TOKENS=TOKEN, SDXL_MAX_BODY_MB="1"
    )


def _assert_json_error(response: requests.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "message"} and body["status"] == "error"
    assert fragment in body["message"]


def _upload_body(session_id: int, size: int) -> bytes:
    body = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    # Padded with the whitespace JSON allows after the object (an unknown field is a 400).
    encoded = json.dumps(body)
    return (encoded + " " * (size - len(encoded))).encode()


def test_without_a_token_every_request_is_401(server):
    for authorization in (None, "Bearer wrong", f"Basic {TOKEN}"):
        headers = {"Authorization": authorization} if authorization else {}
        response = requests.get(f"{server}/create_session", headers=headers, timeout=10)
        _assert_json_error(response, 401, "token")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert not Session.objects.exists()
    response = requests.get(f"{server}/create_session", headers=AUTH, timeout=10)
    assert response.status_code == 200
    assert Session.objects.filter(pk=response.json()["session_id"]).exists()


def test_body_over_the_limit_is_413_and_changes_nothing(server):
    session = session_services.session_create()
    url = f"{server}/post_session_image"
    headers = {**AUTH, "Content-Type": "application/json"}

    over = requests.post(url, data=_upload_body(session.pk, LIMIT + 1), headers=headers, timeout=60)
    _assert_json_error(over, 413, "larger than the limit of 1 MB")
    # Chunked, it has no Content-Length: counted as it is read, and refused past the limit.
    chunks = iter([_upload_body(session.pk, 4 * LIMIT)])
    chunked = requests.post(url, data=chunks, headers=headers, timeout=60)
    _assert_json_error(chunked, 413, "larger than the limit of 1 MB")
    assert list(storage.session_dir(session.pk).iterdir()) == []
    assert not ImageGroup.objects.exists()

    at_limit = requests.post(url, data=_upload_body(session.pk, LIMIT), headers=headers, timeout=60)
    assert at_limit.status_code == 200, at_limit.text
    assert ImageGroup.objects.count() == 1


def test_the_web_workers_end_with_their_master_when_it_is_killed(service_processes):
    """A kill -9 of gunicorn's master (the OOM killer, a supervisor out of patience) leaves
    no worker behind: uvicorn's workers, unlike gunicorn's threaded ones, never check that
    their master still runs."""
    service_processes.gunicorn(workers=2)
    master = service_processes.started[-1]
    tree = process_tree(master.pid)
    assert len(tree) == 3  # the master and its two workers

    master.process.kill()
    master.process.wait()

    wait_until(lambda: not still_running(tree), 10, "the web workers to end with their master")
