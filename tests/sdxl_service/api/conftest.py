import pytest
from rest_framework.test import APIClient


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
