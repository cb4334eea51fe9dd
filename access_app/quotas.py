"""Owners' quotas: the lock that makes a check-then-write hold under races, and the 429."""

from django.db import transaction

from access_app.models import Owner
from access_app.selectors import owner_quota
from core.errors import ServiceError

QUOTA_NAMES = {
    "max_sessions": "sessions",
    "max_images_per_session": "images per session",
    "max_stored_mb": "stored MB",
    "max_concurrent_trainings": "concurrent trainings",
    "max_generations_per_minute": "generations per minute",
    "max_queued_generations": "queued generations",
}
MB = 1024 * 1024


def owner_locked(owner_id: int) -> Owner:
    """The owner's row, locked until the surrounding transaction ends (`SELECT ... FOR
    UPDATE` on PostgreSQL; SQLite's IMMEDIATE transactions already serialize writers): two
    requests of one owner count and write one after the other, so neither can slip past
    a quota the other has just filled."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("owner_locked needs a transaction to hold the lock")
    return Owner.objects.select_for_update().get(pk=owner_id)


def quota_check(
    owner: Owner,
    field: str,
    used: int,
    adding: int = 1,
    retry_after: int | None = None,
    unit: int = 1,
) -> None:
    """429 naming the quota when `used + adding` is past the owner's limit `field` (in
    units of `unit`: MB for stored bytes). `retry_after`: seconds after which the request
    may succeed, when time helps."""
    limit = owner_quota(owner, field)
    if limit is None or used + adding <= limit * unit:
        return

    def amount(value: int) -> str:
        return f"{value / unit:.2f}" if unit > 1 else str(value)

    raise ServiceError(
        f"quota exceeded: {QUOTA_NAMES[field]} (owner {owner.name!r} may have {limit}, has "
        f"{amount(used)}, this asks for {amount(adding)} more); nothing was written",
        status=429,
        retry_after=retry_after,
    )
