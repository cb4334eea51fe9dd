from datetime import timedelta

import pytest
from django.utils import timezone

from access_app.callers import Caller
from access_app.selectors import default_owner
from sessions_app import services as session_services
from training_app.bodies import training_status
from training_app.models import Generation, TrainingRun
from training_app.selectors import generations_visible

pytestmark = pytest.mark.django_db


def _training_run(**fields) -> TrainingRun:
    session = session_services.session_create()
    now = timezone.now()
    return TrainingRun.objects.create(
        session=session,
        status=TrainingRun.Status.RUNNING,
        stage=TrainingRun.Stage.TRAINING,
        total_steps=200,
        heartbeat_at=now,
        training_started_at=now - timedelta(seconds=10),
        **fields,
    )


def test_eta_counts_the_time_per_step_of_this_attempt_only(training_worker):
    fresh = _training_run(step=10)
    resumed = _training_run(step=110, resumed_from_step=100)

    # 10 steps in 10 s either way: 190 and 90 steps left.
    assert training_status(fresh.session_id)["eta_seconds"] == pytest.approx(190, abs=1)
    assert training_status(resumed.session_id)["eta_seconds"] == pytest.approx(90, abs=1)
    assert training_status(resumed.session_id)["resumed_from_step"] == 100


def test_eta_is_unknown_until_a_step_after_the_resume_is_done(training_worker):
    resumed = _training_run(step=100, resumed_from_step=100)
    assert training_status(resumed.session_id)["eta_seconds"] is None


def test_eta_is_unknown_once_no_training_worker_beats(training_worker, settings):
    run = _training_run(step=10)
    assert training_status(run.session_id)["eta_seconds"] == pytest.approx(190, abs=1)

    training_worker.last_seen = timezone.now() - timedelta(
        seconds=settings.SDXL_WORKER_STALE_AFTER + 1
    )
    training_worker.save()
    status = training_status(run.session_id)
    assert status["eta_seconds"] is None
    assert (status["status"], status["step"]) == ("in-progress", 10)  # the rest as it was


def test_eta_is_unknown_once_the_runs_own_heartbeat_missed_its_beats(training_worker, settings):
    run = _training_run(step=10)
    TrainingRun.objects.filter(pk=run.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=settings.SDXL_RUN_STALE_AFTER / 2 + 1)
    )
    assert training_status(run.session_id)["eta_seconds"] is None


def test_a_caller_without_an_owner_sees_the_default_owners_generations():
    """A Caller's owner_id None stands for the default owner (access_app.callers), whose
    generations it creates (services.owner_quotas), so it sees those, not the rows without
    an owner, which only admin tokens see."""
    default_owners = Generation.objects.create(prompt="a", seed=1, owner=default_owner())
    Generation.objects.create(prompt="b", seed=2, owner=None)
    reader = Caller("reader", owner_id=None, scopes=frozenset({"read"}))
    assert list(generations_visible(reader)) == [default_owners]
