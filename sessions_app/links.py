"""Every URL of a session's rows, built by route name in this one module: the API's (named
in sdxl_service/api/urls.py, a layer above, which only a test can check:
tests/test_links.py) and the admin's."""

from django.urls import reverse

from sessions_app.models import TrainingImage


def session_image_url(image: TrainingImage) -> str:
    """GET /sessions/<id>/images/<image_id>: the image file, with the API's access rules."""
    return reverse("session-image", args=[image.group.session_id, image.pk])


def session_image_mask_url(image: TrainingImage) -> str:
    """GET /sessions/<id>/images/<image_id>/mask: the image's mask, a greyscale PNG."""
    return reverse("session-image-mask", args=[image.group.session_id, image.pk])


def training_image_mask_admin_url(image: TrainingImage) -> str:
    return reverse("admin:sessions_app_trainingimage_mask", args=[image.pk])


def session_admin_url(session_id: int) -> str:
    return reverse("admin:sessions_app_session_change", args=[session_id])


def training_image_admin_url(image: TrainingImage) -> str:
    return reverse("admin:sessions_app_trainingimage_file", args=[image.pk])
