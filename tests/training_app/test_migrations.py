"""Data migrations of training_app, run against rows as the code before them wrote them."""

from importlib import import_module

import pytest
from django.apps import apps

from sessions_app import services as session_services
from sessions_app import storage
from training_app.models import Generation, TrainingRun, TrainingSample

pytestmark = pytest.mark.django_db

cancelled_status = import_module("training_app.migrations.0009_run_cancelled_status")
stored_bytes = import_module("training_app.migrations.0012_stored_bytes_of_samples_and_generations")


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


def test_samples_and_completed_generations_already_there_are_measured(settings):
    session = session_services.session_create()
    run = TrainingRun.objects.create(session=session, status="completed")
    sample = TrainingSample.objects.create(run=run, step=1, index=0, filename="step1_0.png")
    gone = TrainingSample.objects.create(run=run, step=1, index=1, filename="step1_1.png")
    folder = storage.session_dir(session.pk) / "samples" / f"run_{run.pk}"
    folder.mkdir(parents=True)
    (folder / sample.filename).write_bytes(b"x" * 30)
    completed = Generation.objects.create(prompt="a", seed=1, status="completed")
    failed = Generation.objects.create(prompt="b", seed=1, status="error")
    for generation in (completed, failed):
        images = settings.GENERATIONS_DIR / str(generation.pk)
        images.mkdir(parents=True)
        (images / "0.png").write_bytes(b"x" * 40)
        (images / "init.png").write_bytes(b"x" * 2)

    stored_bytes.measure_existing_files(apps, None)

    sizes = dict(TrainingSample.objects.values_list("pk", "size"))
    assert sizes == {sample.pk: 30, gone.pk: 0}
    generations = dict(Generation.objects.values_list("pk", "stored_bytes"))
    assert generations == {completed.pk: 42, failed.pk: 0}
