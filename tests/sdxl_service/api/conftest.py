import pytest
from rest_framework.test import APIClient

from sessions_app import services as session_services
from tests.helpers import image_bytes


@pytest.fixture
def api() -> APIClient:
    """A client of the real URLs, without a token (the open mode the tests run in)."""
    return APIClient()


@pytest.fixture
def session():
    """A session with one captioned training image."""
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session


@pytest.fixture(scope="module")
def schema_document(django_db_blocker) -> dict:
    """The OpenAPI description as a client fetches it: /api/schema, JSON."""
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema", {"format": "json"})
    assert response.status_code == 200
    return response.json()


@pytest.fixture
def generations_in_process(monkeypatch, generation_worker):
    """/txt2img's job runs in this process (the worker's part) as soon as the request
    waits for it."""
    from training_app.services.generations import batches, lifecycle

    wait = lifecycle.generation_wait

    def execute_then_wait(generation_id, timeout_s, client_gone=None):
        batches.generation_execute(generation_id)
        return wait(generation_id, timeout_s, client_gone)

    monkeypatch.setattr(lifecycle, "generation_wait", execute_then_wait)
