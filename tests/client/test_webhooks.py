"""verify_webhook accepts what the service's webhook sender signs, and nothing else."""

import time

from sdxl_client import verify_webhook

from training_app.services.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

SECRET = "s3cret"
BODY = (
    b'{"event":"completed","type":"training","id":4,"created_at":"2026-01-01T00:00:00Z","data":{}}'
)


def _headers(timestamp: str, body: bytes = BODY, secret: str = SECRET) -> dict[str, str]:
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(body, timestamp, secret)}


def test_a_body_signed_by_the_service_verifies():
    headers = _headers(str(int(time.time())))
    assert verify_webhook(SECRET, headers, BODY)
    lower = {key.lower(): value for key, value in headers.items()}
    assert verify_webhook(SECRET, lower, BODY, tolerance_s=300)


def test_another_secret_body_or_timestamp_fails():
    now = str(int(time.time()))
    headers = _headers(now)
    assert not verify_webhook("other", headers, BODY)
    assert not verify_webhook(SECRET, headers, BODY + b" ")
    assert not verify_webhook(SECRET, {**headers, TIMESTAMP_HEADER: str(int(now) + 1)}, BODY)
    assert not verify_webhook(SECRET, {TIMESTAMP_HEADER: now}, BODY)


def test_an_old_timestamp_fails_only_with_a_tolerance():
    headers = _headers(str(int(time.time()) - 3600))
    assert verify_webhook(SECRET, headers, BODY)
    assert not verify_webhook(SECRET, headers, BODY, tolerance_s=300)
