import pytest
from rest_framework.test import APIClient


@pytest.fixture(scope="module")
def schema_document(django_db_blocker) -> dict:
    """The OpenAPI description as a client fetches it: /api/schema, JSON."""
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema", {"format": "json"})
    assert response.status_code == 200
    return response.json()
