"""Idempotency keys, as Stripe's API has them: a client that sends a request doing
something (a job, a row) with an `Idempotency-Key` may send it again, after a timeout or an
error, without doing it twice. The API layer (sdxl_service.api.idempotency) asks here
before it runs a request with a key and tells the outcome after.

The first request with a key claims it (a row, unique per owner and key, holding the
request's fingerprint). Its success is kept with the key: a retry with the same key and the
same request is answered that, and nothing runs again. A failure gives the key back (the
row is deleted): the service's failures leave nothing done (a 4xx refuses before writing,
a 503 or 507 rolls back), so the retry runs as if first. The same key on another request
is a 422; a duplicate while the first still runs, a 409. Keys go after
SDXL_IDEMPOTENCY_KEY_HOURS.
"""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from access_app.models import IdempotencyKey
from core.errors import ServiceError

# A claim whose request has not answered after this long past the longest wait a request
# makes (a synchronous /txt2img's SDXL_TXT2IMG_TIMEOUT) lost its process (killed, restarted):
# the next request with the key takes it over rather than answering 409 until it expires.
ABANDONED_AFTER_WAIT_S = 60
# How often a claim is tried when the key's row goes away while we look (its request failed
# and gave it back): once more is enough, a third time is a key changing hands very fast.
_CLAIM_TRIES = 3


@dataclass(frozen=True)
class StoredAnswer:
    """The answer of the request that used the key first."""

    status: int
    body: str  # JSON


def idempotency_key_claim(
    owner_id: int, key: str, fingerprint: str
) -> IdempotencyKey | StoredAnswer:
    """The key's row, claimed for this request, or the answer kept for it. 422 when the key
    was used for another request (another `fingerprint`), 409 while that request runs."""
    now = timezone.now()
    # Every owner's expired keys: the table holds at most a day of keys (indexed by time).
    IdempotencyKey.objects.filter(created_at__lt=now - _lifetime()).delete()
    for _ in range(_CLAIM_TRIES):
        try:
            with transaction.atomic():
                return IdempotencyKey.objects.create(
                    owner_id=owner_id, key=key, fingerprint=fingerprint, created_at=now
                )
        except IntegrityError:
            pass
        existing = IdempotencyKey.objects.filter(owner_id=owner_id, key=key).first()
        if existing is None:  # given back meanwhile: claim it again
            continue
        if existing.fingerprint != fingerprint:
            raise ServiceError(
                "Idempotency-Key: this key was used with another request (another endpoint or "
                "other parameters); a key is only valid for the same request: send a new key "
                "for a new request",
                status=422,
            )
        if existing.response_status is not None:
            return StoredAnswer(existing.response_status, existing.response_body)
        if _taken_over(existing, now):
            existing.created_at = now
            return existing
        running_s = (now - existing.created_at).total_seconds()
        raise ServiceError(
            "Idempotency-Key: a request with this key is still being answered (for "
            f"{running_s:.0f} s); retry once it has answered to get its answer",
            status=409,
            retry_after=1,
        )
    raise ServiceError("Idempotency-Key: the key changed hands too fast; retry", status=409)


def _lifetime() -> timedelta:
    return timedelta(hours=settings.SDXL_IDEMPOTENCY_KEY_HOURS)


def _taken_over(claim: IdempotencyKey, now: datetime) -> bool:
    """Whether the claim was abandoned and is now this request's (a conditional update:
    of two requests taking it over at once, one does)."""
    abandoned_after = timedelta(
        seconds=math.ceil(settings.SDXL_TXT2IMG_TIMEOUT) + ABANDONED_AFTER_WAIT_S
    )
    if now - claim.created_at < abandoned_after:
        return False
    return bool(
        IdempotencyKey.objects.filter(
            pk=claim.pk, response_status__isnull=True, created_at=claim.created_at
        ).update(created_at=now)
    )


def idempotency_key_keep(claim: IdempotencyKey, status: int, body: str) -> None:
    """Keeps the claimed request's success with its key, for its retries."""
    IdempotencyKey.objects.filter(pk=claim.pk).update(response_status=status, response_body=body)


def idempotency_key_release(claim: IdempotencyKey) -> None:
    """Gives the key back after its request failed: a retry runs it again."""
    IdempotencyKey.objects.filter(pk=claim.pk, response_status__isnull=True).delete()
