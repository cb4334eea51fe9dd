"""Reads of sessions for the API and the admin.

The API passes its caller: a session of another owner then reads exactly as a missing one
(a 404 with the same message), so ids cannot be probed. `caller=None` (admin, commands)
sees everything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from django.db.models import Count, QuerySet

from access_app.callers import Caller
from access_app.selectors import caller_owner_id
from core.errors import ServiceError
from sessions_app.models import Session, TrainingImage


def sessions_visible(caller: Caller | None) -> QuerySet[Session]:
    """The one place that decides whose sessions a caller sees: its owner's, or every
    session for admin tokens (and the open API)."""
    if caller is None or caller.is_admin:
        return Session.objects.all()
    return Session.objects.filter(owner_id=caller_owner_id(caller))


def session_get(session_id: int, caller: Caller | None = None) -> Session:
    try:
        return sessions_visible(caller).get(pk=session_id)
    except Session.DoesNotExist:
        raise ServiceError(f"session {session_id} not found", status=404) from None


class _GroupCount(TypedDict):
    group_count: int


if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    # A session as session_list reads it: with the number of its image groups.
    SessionWithGroups = WithAnnotations[Session, _GroupCount]


def session_list(caller: Caller | None = None) -> QuerySet[SessionWithGroups]:
    return sessions_visible(caller).annotate(group_count=Count("image_groups")).order_by("id")


def training_image_get(
    session_id: int, image_id: int, caller: Caller | None = None
) -> TrainingImage:
    image = TrainingImage.objects.filter(
        pk=image_id,
        group__session_id=session_id,
        group__session__in=sessions_visible(caller),
    ).first()
    if image is None:
        raise ServiceError(f"session {session_id} has no image {image_id}", status=404)
    return image


def session_images(session_id: int) -> QuerySet[TrainingImage]:
    return (
        TrainingImage.objects.filter(group__session_id=session_id)
        .select_related("group")
        .order_by("group__number", "id")
    )


def session_image_count(session_id: int) -> int:
    return TrainingImage.objects.filter(group__session_id=session_id).count()
