"""Faults of the service's own processes (real `manage.py worker` and `serve`, the tiny model,
the suite's database and broker): the database away for longer than its timeout, kill -9 of
a worker or of its cluster's sentinel, heartbeat rows of dead workers. Each test checks what
a client sees, what the database says afterwards, and that no process is left behind.
"""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import requests
from django.conf import settings
from django.utils import timezone

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.processes import (
    children_of,
    database_away,
    process_tree,
    processes_with_env,
    still_running,
    wait_until,
)
from tests.system.sdxl_service.test_api_faults import assert_no_service_process_left
from tests.system.training_app.test_worker_faults import CHECKPOINT, ENDLESS, RESUMABLE, STEPS
from training_app.models import TrainingRun, WorkerHeartbeat
from training_app.services import runs as run_services

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# The workers' heartbeat bound, short so that the tests are; the database stays away for
# longer than its timeout (SQLite) but, in the first test, shorter than this bound.
STALE_AFTER_S = 20.0
SQLITE_TIMEOUT_S = 1.0
ETA_STALE_AFTER_S = 6.0  # three of the workers' 2 s beats
EXIT_STALE_AFTER_S = 4.0
AWAY_S = 8.0
TXT2IMG = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5}
RUN_TIMEOUT_S = 180


@pytest.fixture
def fast_faults(settings) -> dict:
    """Short heartbeat bound and database timeout, here and in the service's processes."""
    settings.SDXL_WORKER_STALE_AFTER = STALE_AFTER_S
    return {
        "SDXL_WORKER_STALE_AFTER": str(STALE_AFTER_S),
        "SDXL_SQLITE_TIMEOUT": str(SQLITE_TIMEOUT_S),
    }


def _session_with_images():
    session = session_services.session_create()
    for color in ("red", "green"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    return session


def _beat_since(queue: str, moment) -> WorkerHeartbeat | None:
    return WorkerHeartbeat.objects.filter(queue=queue, last_seen__gt=moment).first()


def _txt2img(url: str) -> requests.Response:
    return requests.post(f"{url}/txt2img", json=TXT2IMG, timeout=RUN_TIMEOUT_S)


def _service_processes() -> list[int]:
    """Every running process that any of this test's service processes started."""
    return processes_with_env("SDXL_QUEUE_NAMESPACE", settings.SDXL_QUEUE_NAMESPACE)


def _stop(process, timeout: float = 60) -> int:
    """SIGTERM, as a supervisor stops it; its exit code."""
    process.process.send_signal(signal.SIGTERM)
    return process.process.wait(timeout=timeout)


def _training_steps_done(run_id: int, steps: int) -> bool:
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status in ("queued", "running"), run.error_message
    return run.step >= steps


def test_database_away_past_its_timeout_the_generation_worker_beats_again_by_itself(
    service_processes, fast_faults
):
    url = service_processes.gunicorn(**fast_faults)
    worker = service_processes.worker("generation", **fast_faults)

    with database_away():
        time.sleep(AWAY_S)
    released = timezone.now()
    released_at = time.monotonic()

    # Nobody touches anything: the worker's next beat goes through.
    wait_until(
        lambda: _beat_since(settings.GENERATION_QUEUE, released),
        STALE_AFTER_S,
        "the generation worker to beat again",
    )
    beating_after_s = time.monotonic() - released_at
    response = _txt2img(url)
    accepted_after_s = time.monotonic() - released_at
    assert response.status_code == 200, response.text
    assert len(response.json()["images_base64"]) == 1
    assert worker.process.poll() is None  # it rode the fault out, as the same process
    assert "heartbeat failed" in worker.log()

    assert _stop(worker) == 0, worker.log()
    assert not WorkerHeartbeat.objects.exists()  # its row is removed on a clean exit
    assert_no_service_process_left(service_processes, settings.SDXL_QUEUE_NAMESPACE)
    print(
        f"database away {AWAY_S:g}s: beating again {beating_after_s:.1f}s and /txt2img "
        f"answered 200 {accepted_after_s:.1f}s after it came back"
    )


def test_kill_9_of_a_training_worker_leaves_no_process_and_a_new_worker_resumes_the_run(
    service_processes, settings
):
    settings.SDXL_RUN_STALE_AFTER = 5.0
    stale_soon = {"SDXL_RUN_STALE_AFTER": "5.0"}
    session = _session_with_images()
    worker = service_processes.worker("training", **stale_soon)
    run = run_services.training_run_start(session.pk, RESUMABLE)
    wait_until(lambda: _training_steps_done(run.pk, CHECKPOINT + 1), RUN_TIMEOUT_S, "a checkpoint")
    tree = process_tree(worker.pid)
    # The worker command, its cluster's sentinel, pusher, monitor and pool process.
    assert len(tree) >= 5, tree

    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would
    worker.process.wait()
    wait_until(lambda: not still_running(tree), 10, "the killed worker's processes to end")
    gone_after_s = time.monotonic() - killed_at
    assert _service_processes() == []  # no orphan to take the next job
    killed = TrainingRun.objects.get(pk=run.pk)
    assert killed.status == "running" and killed.step < STEPS

    replacement = service_processes.worker("training", **stale_soon)
    resumed = wait_until(
        lambda: TrainingRun.objects.filter(pk=run.pk, status__in=["completed", "error"]).first(),
        RUN_TIMEOUT_S,
        "the resumed run to end",
    )
    assert resumed.status == "completed", resumed.error_message + replacement.log()
    assert (resumed.resumed_from_step, resumed.attempts) == (CHECKPOINT, 1)
    assert _stop(replacement) == 0, replacement.log()
    assert _service_processes() == []
    print(f"{len(tree)} processes of the killed worker gone {gone_after_s:.1f}s after kill -9")


def test_a_worker_whose_sentinel_dies_exits_1_and_leaves_nothing(service_processes, fast_faults):
    worker = service_processes.worker("generation", **fast_faults)
    tree = process_tree(worker.pid)
    (sentinel,) = children_of(worker.pid)

    os.kill(sentinel, signal.SIGKILL)
    assert worker.process.wait(timeout=30) == 1, worker.log()
    assert "sentinel died" in worker.log()
    wait_until(lambda: not still_running(tree), 10, "the cluster's processes to end")
    assert _service_processes() == []
    assert not WorkerHeartbeat.objects.exists()


def test_a_worker_that_cannot_beat_for_its_bound_exits_1_and_leaves_nothing(
    service_processes, fast_faults, settings
):
    """The database away for longer than the heartbeat bound: the worker gives up (exit 1,
    which `serve` answers by starting it again, test_serve_supervises) rather than run on
    while the web side counts it as gone."""
    bound = {"SDXL_WORKER_STALE_AFTER": str(EXIT_STALE_AFTER_S)}
    settings.SDXL_WORKER_STALE_AFTER = EXIT_STALE_AFTER_S
    worker = service_processes.worker("generation", **fast_faults | bound)
    tree = process_tree(worker.pid)

    with database_away():
        away_at = time.monotonic()
        exit_code = worker.process.wait(timeout=EXIT_STALE_AFTER_S + 30)
        exited_after_s = time.monotonic() - away_at

    assert exit_code == 1, worker.log()
    assert "no heartbeat written" in worker.log()
    assert exited_after_s >= EXIT_STALE_AFTER_S - 1  # it retried until the bound first
    wait_until(lambda: not still_running(tree), 10, "the cluster's processes to end")
    assert _service_processes() == []
    print(f"database away: the worker exited 1 after {exited_after_s:.1f}s")


def test_eta_is_null_once_the_training_worker_died(
    service_processes, fast_faults, client, settings
):
    # A bound of its own, shorter: nothing here keeps the database away.
    settings.SDXL_WORKER_STALE_AFTER = ETA_STALE_AFTER_S
    session = _session_with_images()
    worker = service_processes.worker(
        "training", **fast_faults | {"SDXL_WORKER_STALE_AFTER": str(ETA_STALE_AFTER_S)}
    )
    run = run_services.training_run_start(session.pk, ENDLESS)
    wait_until(lambda: _training_steps_done(run.pk, 3), RUN_TIMEOUT_S, "training steps")

    def status() -> dict:
        return client.post("/train_status", {"session_id": session.pk}, "application/json").json()

    assert isinstance(status()["eta_seconds"], int)
    worker.kill()
    killed_at = time.monotonic()
    # Within the heartbeat bound, not SDXL_RUN_STALE_AFTER (60 s) later.
    seen = wait_until(
        lambda: (answer := status())["eta_seconds"] is None and answer,
        ETA_STALE_AFTER_S + 10,
        "eta_seconds to become null",
    )
    assert seen["status"] == "in-progress"  # nobody has resumed or ended it yet
    assert TrainingRun.objects.get(pk=run.pk).status == "running"
    assert _service_processes() == []
    print(f"eta_seconds null {time.monotonic() - killed_at:.1f}s after the worker was killed")


def test_heartbeat_rows_of_dead_workers_are_pruned(service_processes, fast_faults):
    import socket

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a pid of this host that no longer runs
    long_ago = timezone.now() - timedelta(seconds=STALE_AFTER_S * 21)
    rows = {
        "dead here": (socket.gethostname(), ended.pid, timezone.now()),
        "not seen for long": ("elsewhere", 7, long_ago),
        "alive elsewhere": ("elsewhere", 8, timezone.now()),
    }
    for host, pid, seen in rows.values():
        WorkerHeartbeat.objects.create(
            queue=settings.GENERATION_QUEUE, host=host, pid=pid, started_at=seen, last_seen=seen
        )

    worker = service_processes.worker("training", **fast_faults)
    wait_until(
        lambda: WorkerHeartbeat.objects.count() == 2, STALE_AFTER_S, "dead workers' rows pruned"
    )
    left = set(WorkerHeartbeat.objects.values_list("host", "pid"))
    assert left == {("elsewhere", 8), (socket.gethostname(), worker.pid)}

    assert _stop(worker) == 0, worker.log()
    assert list(WorkerHeartbeat.objects.values_list("host", "pid")) == [("elsewhere", 8)]
    assert _service_processes() == []
