"""Reads of sessions for the API and the admin."""

from django.db.models import Count, QuerySet

from core.errors import ServiceError
from sessions_app.models import Session, TrainingImage


def session_get(session_id: int) -> Session:
    try:
        return Session.objects.get(pk=session_id)
    except Session.DoesNotExist:
        raise ServiceError(f"session {session_id} not found", status=404) from None


def session_list() -> QuerySet[Session]:
    return Session.objects.annotate(group_count=Count("image_groups")).order_by("id")


def training_image_get(session_id: int, image_id: int) -> TrainingImage:
    image = TrainingImage.objects.filter(pk=image_id, group__session_id=session_id).first()
    if image is None:
        raise ServiceError(f"session {session_id} has no image {image_id}", status=404)
    return image


def session_images(session_id: int) -> QuerySet[TrainingImage]:
    return (
        TrainingImage.objects.filter(group__session_id=session_id)
        .select_related("group")
        .order_by("group__number", "id")
    )
