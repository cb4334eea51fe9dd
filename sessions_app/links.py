"""Every URL of a session's rows, built by route name in this one module: the API's (named
in sdxl_service/api/urls.py, a layer above, which only a test can check:
tests/test_links.py) and the admin's."""

from django.urls import reverse

from sessions_app.models import TrainingImage


def session_image_url(image: TrainingImage) -> str:
    """GET /sessions/<id>/images/<image_id>: the image file, with the API's access rules."""
    return reverse("session-image", args=[image.group.session_id, image.pk])


def session_admin_url(session_id: int) -> str:
    return reverse("admin:sessions_app_session_change", args=[session_id])


def training_image_admin_url(image: TrainingImage) -> str:
    return reverse("admin:sessions_app_trainingimage_file", args=[image.pk])


def session_image_mask_url(image: TrainingImage) -> str:
    """GET /sessions/<id>/images/<image_id>/mask: the image's mask file.

    Written out rather than reversed: the route is added with mask storage at upload (a
    branch of its own); once it is here this becomes reverse("session-image-mask", ...) as
    session_image_url is."""
    return f"{session_image_url(image)}/mask"
