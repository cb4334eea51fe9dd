"""Reads of sessions for the API and the admin."""

from django.db.models import Count, QuerySet

from core.errors import ServiceError
from sessions_app.models import Session


def session_get(session_id: int) -> Session:
    try:
        return Session.objects.get(pk=session_id)
    except Session.DoesNotExist:
        raise ServiceError(f"session {session_id} not found", status=404) from None


def session_list() -> QuerySet[Session]:
    return Session.objects.annotate(group_count=Count("image_groups")).order_by("id")
