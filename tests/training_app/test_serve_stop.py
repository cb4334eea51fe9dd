"""`manage.py serve` as a real process stops every process it started (gunicorn and its
workers, both django-q2 clusters and their sentinel, pusher, monitor and pool processes)
within its grace period: on Ctrl-C, which signals the terminal's whole process group at
once, and on a SIGTERM to serve alone."""

import os
import signal
import sys
import time

import pytest
import requests
from django.conf import settings

from tests.processes import (
    free_port,
    process_tree,
    processes_with_env,
    still_running,
    wait_until,
)
from training_app.management.commands.serve import STOP_GRACE_S
from training_app.models import WorkerHeartbeat

pytestmark = pytest.mark.e2e

MARGIN_S = 5


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c-to-the-process-group", "sigterm-to-serve-alone"],
)
def test_serve_stops_every_process_it_started(service_processes, signum, whole_group):
    port = free_port()
    serve = service_processes._start(
        "serve",
        [sys.executable, "manage.py", "serve", "--port", str(port), "--web-workers", "1"],
        {},
    )

    def up() -> bool:
        assert serve.process.poll() is None, serve.log()
        try:
            requests.get(f"http://127.0.0.1:{port}/list_sessions", timeout=2)
        except requests.RequestException:
            return False
        queues = set(WorkerHeartbeat.objects.values_list("queue", flat=True))
        return queues == {settings.TRAINING_QUEUE, settings.GENERATION_QUEUE}

    wait_until(up, 60, "serve to answer and both workers to beat", interval=0.3)
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
