"""Owners' quotas on training and generation, counted under the owner's lock so that two
requests of one owner at the same moment cannot both take the last slot."""

import math
from datetime import timedelta

from django.utils import timezone

from access_app.callers import Caller
from access_app.quotas import owner_locked, quota_check
from access_app.selectors import caller_owner_id, default_owner, owner_quota
from sessions_app.models import Session
from training_app.models import Generation, TrainingRun

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
