"""`manage.py serve` started twice (issue 25, point 9): a second serve on the same port
stops at once with "port N is in use", one on another port but the same data dir is
refused naming the first one's pid, and neither starts a process (no second pair of
workers); the first one carries on, then stops cleanly."""

import fcntl
import signal
import sys

import pytest
import requests
from django.conf import settings

from tests.processes import free_port, processes_with_env
from training_app.models import WorkerHeartbeat
from training_app.workers.supervisor import SERVE_LOCK_NAME

# The refusals are the data dir's lock and the port's: nothing here depends on the
# database or broker, which only store the heartbeat rows.
pytestmark = [pytest.mark.e2e, pytest.mark.one_pass]


def test_a_second_serve_is_refused_at_once_and_starts_no_worker(service_processes, data_dir):
    serve, url = service_processes.serve()
    port = int(url.rsplit(":", 1)[1])
    namespace = settings.SDXL_QUEUE_NAMESPACE
    processes = set(processes_with_env("SDXL_QUEUE_NAMESPACE", namespace))
    workers = set(WorkerHeartbeat.objects.values_list("queue", "pid"))
    assert len(workers) == 2

    for args, refusal in [
        (["--port", str(port)], f"port {port} is in use"),
        (
            ["--port", str(free_port())],
            f"another serve (pid {serve.pid}, port {port}) already uses the data dir {data_dir}",
        ),
    ]:
        second = service_processes._start(
            "serve-again", [sys.executable, "manage.py", "serve", *args, "--web-workers", "1"], {}
        )
        assert second.process.wait(timeout=60) != 0, second.log()
        assert refusal in second.log()
        assert "Operations to perform" not in second.log()  # not even migrations ran
        # Nothing started: the same processes, the same two workers beating.
        assert set(processes_with_env("SDXL_QUEUE_NAMESPACE", namespace)) == processes
        assert set(WorkerHeartbeat.objects.values_list("queue", "pid")) == workers

    # The first serve carries on, then stops cleanly, leaving no process and no lock.
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(timeout=60) == 0, serve.log()
    assert processes_with_env("SDXL_QUEUE_NAMESPACE", namespace) == []
    with (data_dir / SERVE_LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises if still held


def test_allow_shared_data_dir_lets_a_second_serve_start(service_processes):
    first, _ = service_processes.serve()
    second, url = service_processes.serve("--allow-shared-data-dir")
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert first.process.poll() is None and second.process.poll() is None
