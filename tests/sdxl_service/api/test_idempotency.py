"""The Idempotency-Key header (issue 26, point 4): a retry with the same key answers the
first answer and starts nothing again; another request with the key is a 422, a duplicate
while the first is being answered a 409; keys expire."""

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from access_app.idempotency import ABANDONED_AFTER_WAIT_S, idempotency_key_claim
from access_app.models import IdempotencyKey
from access_app.selectors import default_owner
from sdxl_service.api.idempotency import request_fingerprint
from sessions_app.models import TrainingImage
from tests.helpers import image_bytes
from training_app.models import Generation

pytestmark = pytest.mark.django_db

QUEUED = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5, "async": True}


def _txt2img(api, body, key):
    return api.post("/txt2img", body, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_a_retry_with_the_key_answers_the_first_answer_and_queues_one_generation(
    api, generation_worker
):
    first = _txt2img(api, QUEUED, "retry-1")
    # Same parameters, another order, the slashed path: the same request.
    again = api.post(
        "/txt2img/", dict(reversed(QUEUED.items())), format="json", HTTP_IDEMPOTENCY_KEY="retry-1"
    )

    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert Generation.objects.count() == 1
    # Without a key, or with another, a new request.
    assert api.post("/txt2img", QUEUED, format="json").status_code == 202
    assert _txt2img(api, QUEUED, "retry-2").status_code == 202
    assert Generation.objects.count() == 3


def test_the_key_with_another_request_is_a_422_and_starts_nothing(api, generation_worker, session):
    assert _txt2img(api, QUEUED, "mine").status_code == 202

    other = _txt2img(api, {**QUEUED, "prompt": "a blue square"}, "mine")
    elsewhere = api.post(
        "/train_lora", {"session_id": session.pk}, format="json", HTTP_IDEMPOTENCY_KEY="mine"
    )

    assert other.status_code == elsewhere.status_code == 422
    assert "another request" in other.json()["message"]
    assert Generation.objects.count() == 1
    assert not session.training_runs.exists()


def test_a_duplicate_while_the_first_is_being_answered_is_a_409(api, generation_worker, rf):
    # The first request has claimed the key and not answered yet.
    drf_request = _drf_request(rf, QUEUED)
    idempotency_key_claim(default_owner().pk, "slow", request_fingerprint(drf_request))

    duplicate = _txt2img(api, QUEUED, "slow")

    assert duplicate.status_code == 409
    assert duplicate["Retry-After"] == "1"
    assert "still being answered" in duplicate.json()["message"]
    assert not Generation.objects.exists()


def test_a_key_whose_first_request_never_answered_is_taken_over(
    api, generation_worker, rf, settings
):
    """Its process died mid-request: after the longest a request waits, a retry runs."""
    drf_request = _drf_request(rf, QUEUED)
    idempotency_key_claim(default_owner().pk, "orphan", request_fingerprint(drf_request))
    abandoned_s = settings.SDXL_TXT2IMG_TIMEOUT + ABANDONED_AFTER_WAIT_S + 1
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(seconds=abandoned_s))

    retried = _txt2img(api, QUEUED, "orphan")

    assert retried.status_code == 202
    assert Generation.objects.count() == 1


def test_a_key_past_its_hours_starts_a_new_request(api, generation_worker, settings):
    assert _txt2img(api, QUEUED, "old").status_code == 202
    expired = timezone.now() - timedelta(hours=settings.SDXL_IDEMPOTENCY_KEY_HOURS, seconds=1)
    IdempotencyKey.objects.update(created_at=expired)

    again = _txt2img(api, QUEUED, "old")

    assert again.status_code == 202 and "Idempotent-Replayed" not in again
    assert Generation.objects.count() == 2
    assert IdempotencyKey.objects.count() == 1


def test_a_multipart_upload_retried_with_its_key_stores_the_images_once(api, session):
    def upload():
        photo = SimpleUploadedFile("photo.png", image_bytes(), content_type="image/png")
        # The test client draws the same boundary each time; a browser or requests does not,
        # and the body's bytes differ: the key compares the fields and the files' contents.
        return api.post(
            f"/sessions/{session.pk}/images",
            {"image": [photo], "caption": ["a red square"]},
            format="multipart",
            HTTP_IDEMPOTENCY_KEY="photos",
        )

    before = TrainingImage.objects.count()
    first, again = upload(), upload()

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert TrainingImage.objects.count() == before + 1


def test_a_failed_request_gives_its_key_back(api, generation_worker):
    """Nothing was done: its retry runs again rather than replaying the error."""
    refused = _txt2img(api, {**QUEUED, "loras": [{"session_id": 999999}]}, "fix-it")

    assert refused.status_code == 404
    assert not IdempotencyKey.objects.exists()


def test_the_schema_lists_the_header_where_it_is_honoured(schema_document):
    def parameters(path, method):
        operation = schema_document["paths"][path][method]
        return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}

    assert "Idempotency-Key" in parameters("/txt2img", "post")
    assert "Idempotency-Key" in parameters("/sessions/{session_id}/images", "post")
    assert "422" in schema_document["paths"]["/train_lora"]["post"]["responses"]
    assert "Idempotency-Key" not in parameters("/train_status", "post")


def _drf_request(rf, body):
    """The DRF request /txt2img gets for `body` (its fingerprint is the key's)."""
    from rest_framework.parsers import JSONParser
    from rest_framework.request import Request

    django_request = rf.post("/txt2img", body, content_type="application/json")
    return Request(django_request, parsers=[JSONParser()])
