"""`manage.py serve` as a real process stops every process it started (gunicorn and its
workers, both django-q2 clusters and their sentinel, pusher, monitor and pool processes)
within its grace period: on Ctrl-C, which signals the terminal's whole process group at
once, and on a SIGTERM to serve alone, also while a training run outlasts the grace."""

import os
import signal
import time

import pytest
from django.conf import settings

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.processes import (
    process_tree,
    processes_with_env,
    still_running,
    wait_until,
)
from training_app.models import TrainingRun
from training_app.services import runs as run_services
from training_app.workers.supervisor import STOP_GRACE_S

pytestmark = pytest.mark.e2e

MARGIN_S = 5
ENDLESS = {"steps": 100_000, "resolution": 64, "batch_size": 1, "seed": 1}


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-serve-alone"],
)
def test_serve_stops_every_process_it_started(service_processes, signum, whole_group):
    serve, _ = service_processes.serve()
    tree = process_tree(serve.pid)
    # serve, gunicorn's arbiter and worker, and per queue the worker command, its sentinel,
    # pusher, monitor and pool worker.
    assert len(tree) >= 1 + 2 + 2 * 5, tree

    sent = time.monotonic()
    if whole_group:
        os.killpg(serve.pid, signum)  # what a terminal's Ctrl-C does
    else:
        serve.process.send_signal(signum)
    deadline = sent + STOP_GRACE_S + MARGIN_S
    while still_running(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    took = time.monotonic() - sent
    left = still_running(tree)
    assert not left, f"{len(left)} of {len(tree)} processes still run after {took:.1f}s"
    assert serve.process.wait(timeout=5) == 0, serve.log()
    # Nor any process started after the snapshot: all carry this test's queue namespace.
    assert processes_with_env("SDXL_QUEUE_NAMESPACE", settings.SDXL_QUEUE_NAMESPACE) == []
    print(f"{len(tree)} processes stopped in {took:.1f}s; killed any: {'killing' in serve.log()}")


@pytest.mark.faults
def test_sigterm_during_a_training_longer_than_the_grace_stops_every_process(service_processes):
    grace_s = 5
    serve, url = service_processes.serve("--stop-grace", str(grace_s))
    session = session_services.session_create()
    for color in ("red", "green"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    run = run_services.training_run_start(session.pk, ENDLESS)

    def training() -> bool:
        row = TrainingRun.objects.get(pk=run.pk)
        assert row.status in ("queued", "running"), row.error_message
        return row.step >= 2

    wait_until(training, 180, "training steps")
    tree = process_tree(serve.pid)

    sent = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    deadline = sent + grace_s + MARGIN_S
    while still_running(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    took = time.monotonic() - sent
    assert still_running(tree) == [], f"still running {took:.1f}s after SIGTERM"
    assert serve.process.wait(timeout=5) == 0, serve.log()
    assert "killing them" in serve.log()  # the run outlasted the grace
    assert processes_with_env("SDXL_QUEUE_NAMESPACE", settings.SDXL_QUEUE_NAMESPACE) == []
    # Cut short, not ended: the next start resumes it (from its last checkpoint, if any).
    stopped = TrainingRun.objects.get(pk=run.pk)
    assert stopped.status == "running" and stopped.step < ENDLESS["steps"]
    steps_then = stopped.step
    time.sleep(3)
    assert TrainingRun.objects.get(pk=run.pk).step == steps_then  # nobody trains it on
    print(f"{len(tree)} processes stopped {took:.1f}s after SIGTERM (grace {grace_s}s)")
