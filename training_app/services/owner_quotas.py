"""Owners' quotas on training and generation, counted under the owner's lock so that two
requests of one owner at the same moment cannot both take the last slot."""

import math
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from access_app.callers import Caller
from access_app.quotas import owner_locked, quota_check
from access_app.selectors import caller_owner_id, default_owner, owner_quota
from core.errors import ServiceError
from sessions_app.models import Session
from training_app.models import Generation, TrainingRun
from training_app.queue_selectors import seconds_per_image

RATE_WINDOW = timedelta(minutes=1)


def training_slot_check(session: Session) -> None:
    """429 when the session's owner already runs (or queues) as many trainings as its
    quota allows. Call inside the transaction that creates the run."""
    if session.owner_id is None:
        return
    owner = owner_locked(session.owner_id)
    active = TrainingRun.objects.filter(
        session__owner=owner, status__in=TrainingRun.ACTIVE_STATUSES
    ).count()
    quota_check(owner, "max_concurrent_trainings", active)


def generation_owner(caller: Caller | None) -> int:
    """The owner a new generation belongs to; for an API caller, after checking its
    generations-per-minute quota (429 with Retry-After: when the oldest generation of the
    last minute leaves the window). Call inside the transaction that creates the row."""
    if caller is None:  # not through the API: no quota
        return default_owner().pk
    owner = owner_locked(caller_owner_id(caller))
    if owner_quota(owner, "max_generations_per_minute") is None:
        return owner.pk
    now = timezone.now()
    recent = Generation.objects.filter(owner=owner, created_at__gt=now - RATE_WINDOW)
    oldest = recent.order_by("created_at").values_list("created_at", flat=True).first()
    retry_after = (
        max(1, math.ceil((oldest + RATE_WINDOW - now).total_seconds())) if oldest else None
    )
    quota_check(owner, "max_generations_per_minute", recent.count(), retry_after=retry_after)
    return owner.pk


def queued_generations_check(owner_id: int, caller: Caller | None) -> None:
    """429 with Retry-After when SDXL_MAX_QUEUED_GENERATIONS generations already wait, or
    (for an API caller) as many of its owner's as its queued-generations quota allows.
    Call inside the transaction that creates the row, after `generation_owner` (which locks
    the owner: its count is exact; the global count may pass its bound by the requests of
    other owners created at that very moment, on PostgreSQL)."""
    queued = Generation.objects.filter(status=Generation.Status.QUEUED)
    limit = settings.SDXL_MAX_QUEUED_GENERATIONS
    if limit and queued.count() >= limit:
        raise ServiceError(
            f"the generation queue is full: {limit} generations wait, the most "
            "SDXL_MAX_QUEUED_GENERATIONS allows; nothing was written: retry after "
            "Retry-After seconds",
            status=429,
            retry_after=_queue_moves_after_s(),
        )
    if caller is not None:
        owner = owner_locked(owner_id)
        used = queued.filter(owner=owner).count()
        quota_check(owner, "max_queued_generations", used, retry_after=_queue_moves_after_s())


def _queue_moves_after_s() -> int:
    """Seconds until the queue has likely moved on by one request: the recent time per image
    (a request makes one at least); before any generation completed, a guess of 10 s."""
    per_image = seconds_per_image()
    return max(1, math.ceil(per_image)) if per_image is not None else 10
