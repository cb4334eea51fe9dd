"""Data migrations of training_app, run against rows as the code before them wrote them."""

from importlib import import_module

import pytest
from django.apps import apps

from sessions_app import services as session_services
from training_app.models import TrainingRun

pytestmark = pytest.mark.django_db

cancelled_status = import_module("training_app.migrations.0009_run_cancelled_status")


def test_runs_cancelled_before_the_status_existed_end_cancelled_and_back():
    session = session_services.session_create()
    cancelled = TrainingRun.objects.create(
        session=session, status="error", error_message="training was cancelled"
    )
    failed = TrainingRun.objects.create(
        session=session, status="error", error_message="no training images"
    )
    completed = TrainingRun.objects.create(session=session, status="completed")

    cancelled_status.cancelled_runs_say_so(apps, None)

    statuses = dict(TrainingRun.objects.values_list("pk", "status"))
    assert statuses == {cancelled.pk: "cancelled", failed.pk: "error", completed.pk: "completed"}
    cancelled_status.cancelled_runs_were_errors(apps, None)
    assert TrainingRun.objects.get(pk=cancelled.pk).status == "error"
