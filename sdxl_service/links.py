"""The URLs of the session page's actions (sdxl_service.admin names them), built by route
name in this one module (tests/test_links.py checks each name exists)."""

from django.urls import reverse

from sessions_app.models import Session


def start_training_admin_url(session: Session) -> str:
    return reverse("admin:sessions_app_session_start_training", args=[session.pk])


def cancel_training_admin_url(session: Session) -> str:
    return reverse("admin:sessions_app_session_cancel_training", args=[session.pk])
