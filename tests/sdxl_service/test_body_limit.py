import json

import pytest
from rest_framework.test import APIClient

from sessions_app import services as session_services
from sessions_app.models import ImageGroup, Session
from tests.helpers import b64, image_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation, LoraArtifact, TrainingRun

pytestmark = pytest.mark.django_db

POST_ENDPOINTS = [
    "/post_session_image",
    "/train_lora",
    "/train_status",
    "/get_lora",
    "/upload_lora",
    "/delete_session",
    "/txt2img",
]
LIMIT = 4096


@pytest.fixture
def small_body_limit(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT


def _body_of_size(size: int, session_id: int) -> bytes:
    """A valid request for every endpoint (a real image), padded to `size` bytes of JSON."""
    body = {
        "session_id": session_id,
        "image_base64": b64(image_bytes()),
        "prompt": "x",
        "lora_base64": b64(b"x"),
    }
    padding = size - len(json.dumps({**body, "padding": ""}))
    encoded = json.dumps({**body, "padding": "p" * padding}).encode()
    assert len(encoded) == size
    return encoded


@pytest.mark.parametrize("path", POST_ENDPOINTS)
def test_body_over_the_limit_is_413_json_and_changes_nothing(path, small_body_limit, data_dir):
    session = session_services.session_create()
    files_before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    response = APIClient().generic(
        "POST", path, _body_of_size(LIMIT + 1, session.pk), content_type="application/json"
    )
    assert_error(response, 413, "larger than the limit")
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == files_before
    assert list(Session.objects.values_list("pk", flat=True)) == [session.pk]
    assert not ImageGroup.objects.exists() and not TrainingRun.objects.exists()
    assert not LoraArtifact.objects.exists() and not Generation.objects.exists()


def test_body_at_the_limit_is_parsed(small_body_limit):
    session = session_services.session_create()
    # Padded with spaces inside the base64, which it ignores (an unknown field is a 400).
    body = {"session_id": session.pk, "image_base64": b64(image_bytes()), "prompt": "x"}
    body["image_base64"] += " " * (LIMIT - len(json.dumps(body).encode()))
    encoded = json.dumps(body).encode()
    assert len(encoded) == LIMIT
    response = APIClient().generic("POST", "/post_session_image", encoded, "application/json")
    assert response.status_code == 200, response.content
    assert ImageGroup.objects.count() == 1


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000],
    ids=["list", "object"],
)
def test_json_nested_too_deep_is_400_not_500(body):
    response = APIClient().generic("POST", "/train_status", body, content_type="application/json")
    assert_error(response, 400, "nested too deeply")
