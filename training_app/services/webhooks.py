"""Webhooks: a run's or generation's events posted to the URL its request gave.

Events are recorded in the database with the change they report (WebhookDelivery: an
outbox) and sent by a delivery thread of each worker process (`webhooks_deliver_due`),
never by a web request's thread: a slow or dead receiver delays nothing but its own
deliveries. Each delivery is retried with exponential back-off until it is answered 2xx
or SDXL_WEBHOOK_MAX_ATTEMPTS attempts were made; every outcome stays on the row (admin).

Only hosts listed in SDXL_WEBHOOK_ALLOWED_HOSTS may be targets, checked when the request
is made and again before each attempt, and redirects are not followed: the service cannot
be made to call arbitrary addresses (server-side request forgery). Bodies are signed:

    X-SDXL-Signature: sha256=<hex HMAC-SHA256 of "<X-SDXL-Timestamp>.<body>" with
                      SDXL_WEBHOOK_SECRET>
"""

import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from core.errors import ServiceError
from training_app.models import Generation, TrainingRun, WebhookDelivery

logger = logging.getLogger(__name__)

WEBHOOK_EVENTS = ("started", "progress", "sample", "checkpoint", "completed", "failed")
DEFAULT_WEBHOOK_EVENTS = ("completed", "failed")
SIGNATURE_HEADER = "X-SDXL-Signature"
TIMESTAMP_HEADER = "X-SDXL-Timestamp"
EVENT_HEADER = "X-SDXL-Event"
DELIVERY_HEADER = "X-SDXL-Delivery"
_TIMEOUT_S = 10
# A delivery claimed longer ago than this by a thread that died is sent again.
_CLAIM_EXPIRES_S = 60
# Progress events: one each time a run or generation passes another tenth of its steps.
PROGRESS_EVENTS = 10


def webhook_target_check(url: str | None, events: list[str] | None) -> tuple[str, list[str]]:
    """The (url, events) to record for a request; ("", []) without a url. 400 when
    webhooks are off, the url is no http(s) URL, or its host is not allowed."""
    if not url:
        if events:
            raise ServiceError("webhook_events needs a webhook_url")
        return "", []
    if not settings.SDXL_WEBHOOK_ALLOWED_HOSTS or not settings.SDXL_WEBHOOK_SECRET:
        raise ServiceError(
            "webhooks are off: the operator sets SDXL_WEBHOOK_ALLOWED_HOSTS and "
            "SDXL_WEBHOOK_SECRET to turn them on"
        )
    problem = _url_problem(url)
    if problem:
        raise ServiceError(f"webhook_url {problem}")
    return url, list(dict.fromkeys(events or DEFAULT_WEBHOOK_EVENTS))


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if parts.username or parts.password:
        return "must not hold credentials (sign with SDXL_WEBHOOK_SECRET instead)"
    if not host_allowed(parts.hostname):
        return f"host {parts.hostname} is not in SDXL_WEBHOOK_ALLOWED_HOSTS"
    return None


def host_allowed(host: str) -> bool:
    """`host` is listed, or is under a listed `.domain` (Django's ALLOWED_HOSTS form)."""
    host = host.lower().rstrip(".")
    for allowed in settings.SDXL_WEBHOOK_ALLOWED_HOSTS:
        allowed = allowed.lower()
        if host == allowed or (allowed.startswith(".") and host.endswith(allowed)):
            return True
    return False


def webhook_emit(subject: TrainingRun | Generation, event: str, data: dict[str, Any]) -> None:
    """Records `event` for delivery if `subject`'s request asked for it."""
    if not subject.webhook_url or event not in subject.webhook_events:
        return
    kind = "training" if isinstance(subject, TrainingRun) else "generation"
    now = timezone.now()
    WebhookDelivery.objects.create(
        event=event,
        url=subject.webhook_url,
        run=subject if isinstance(subject, TrainingRun) else None,
        generation=subject if isinstance(subject, Generation) else None,
        payload={
            "event": event,
            "type": kind,
            "id": subject.pk,
            "created_at": now.isoformat(),
            "data": json.loads(json.dumps(data, default=str)),
        },
        next_attempt_at=now,
    )


def progress_tenth(done: int, total: int) -> int:
    """Which tenth of the steps `done` steps reached (a progress event fires as it grows)."""
    return done * PROGRESS_EVENTS // total if total else 0


def webhooks_deliver_due(limit: int = 50) -> int:
    """Sends the deliveries that are due, oldest first, each claimed so that one delivery
    thread alone sends it; returns how many were attempted."""
    now = timezone.now()
    due = WebhookDelivery.objects.filter(
        Q(status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now)
        | Q(
            status=WebhookDelivery.Status.SENDING,
            claimed_at__lt=now - timedelta(seconds=_CLAIM_EXPIRES_S),
        )
    ).order_by("next_attempt_at", "id")
    attempted = 0
    for delivery_id in due.values_list("pk", flat=True)[:limit]:
        claimed = (
            WebhookDelivery.objects.filter(pk=delivery_id)
            .filter(
                Q(status=WebhookDelivery.Status.PENDING)
                | Q(claimed_at__lt=now - timedelta(seconds=_CLAIM_EXPIRES_S))
            )
            .update(status=WebhookDelivery.Status.SENDING, claimed_at=timezone.now())
        )
        if claimed:
            _attempt(WebhookDelivery.objects.get(pk=delivery_id))
            attempted += 1
    return attempted


def signature(body: bytes, timestamp: str, secret: str) -> str:
    """The X-SDXL-Signature value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def _attempt(delivery: WebhookDelivery) -> None:
    import requests

    attempts = delivery.attempts + 1
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    problem = _url_problem(delivery.url)  # the allowed hosts may have changed since
    status_code, error = None, ""
    if problem:
        error = f"not sent: webhook_url {problem}"
    else:
        try:
            response = requests.post(
                delivery.url,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "sdxl-lora-service-webhooks",
                    EVENT_HEADER: delivery.event,
                    DELIVERY_HEADER: str(delivery.pk),
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: signature(body, timestamp, settings.SDXL_WEBHOOK_SECRET),
                },
                timeout=_TIMEOUT_S,
                allow_redirects=False,
            )
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"answered {status_code}"
        except requests.RequestException as exception:
            error = f"{type(exception).__name__}: {exception}"[:1000]
    now = timezone.now()
    fields: dict[str, object] = {
        "attempts": attempts,
        "last_status_code": status_code,
        "last_error": error,
    }
    if not error:
        fields |= {"status": WebhookDelivery.Status.DELIVERED, "delivered_at": now}
    elif problem or attempts >= settings.SDXL_WEBHOOK_MAX_ATTEMPTS:
        fields |= {"status": WebhookDelivery.Status.FAILED}
        logger.warning("webhook %s to %s given up: %s", delivery.pk, delivery.url, error)
    else:
        fields |= {
            "status": WebhookDelivery.Status.PENDING,
            "next_attempt_at": now + retry_delay(attempts),
        }
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)


def retry_delay(attempts: int) -> timedelta:
    """SDXL_WEBHOOK_RETRY_BASE_S x 4^(attempts - 1): 5 s, 20 s, 80 s, 5 min, 21 min..."""
    return timedelta(seconds=settings.SDXL_WEBHOOK_RETRY_BASE_S * 4 ** (attempts - 1))
