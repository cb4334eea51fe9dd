"""`manage.py serve` as a real process supervises what it started: a worker or the web server
killed with SIGKILL is started again, while the rest, the web server above all, carries on
(a client's request in flight is answered), and nothing of the dead process is left."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.processes import (
    children_of,
    process_tree,
    processes_with_env,
    still_running,
    wait_until,
)
from training_app.models import Generation, WorkerHeartbeat

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

TXT2IMG = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5}
TIMEOUT_S = 180


def _worker_pid(queue: str) -> int | None:
    """The pid of the queue's worker, once exactly one beats (a dead one's row pruned)."""
    pids = list(WorkerHeartbeat.objects.filter(queue=queue).values_list("pid", flat=True))
    return pids[0] if len(pids) == 1 else None


def _replaced(queue: str, killed: int) -> int | None:
    pid = _worker_pid(queue)
    return pid if pid not in (None, killed) else None


def _web_server_pid(serve_pid: int) -> int:
    (pid,) = [
        pid
        for pid in children_of(serve_pid)
        if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return pid


class _Poller(threading.Thread):
    """GET /list_sessions every 0.3 s until stopped; records every answer or error."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.answers, self.stopping = url, [], threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.answers.append(
                    requests.get(f"{self.url}/list_sessions", timeout=30).status_code
                )
            except requests.RequestException as error:
                self.answers.append(type(error).__name__)
            self.stopping.wait(0.3)


def test_serve_starts_a_killed_worker_again_and_the_web_server_keeps_answering(service_processes):
    serve, url = service_processes.serve()
    poller = _Poller(url)
    poller.start()
    in_flight: list = []
    client = threading.Thread(
        target=lambda: in_flight.append(
            requests.post(f"{url}/txt2img", json=TXT2IMG, timeout=TIMEOUT_S)
        )
    )
    client.start()
    wait_until(lambda: Generation.objects.exists(), 30, "the /txt2img to be in flight")

    # The training worker, alone: its cluster goes with it; the /txt2img in flight does not.
    training = _worker_pid(settings.TRAINING_QUEUE)
    training_tree = process_tree(training)
    killed_at = time.monotonic()
    os.kill(training, signal.SIGKILL)
    wait_until(lambda: _replaced(settings.TRAINING_QUEUE, training), 60, "a new training worker")
    training_back_s = time.monotonic() - killed_at
    assert still_running(training_tree) == []
    client.join(TIMEOUT_S)
    assert in_flight and in_flight[0].status_code == 200, in_flight
    assert len(in_flight[0].json()["images_base64"]) == 1

    # The generation worker: started again, and /txt2img is served again.
    generation = _worker_pid(settings.GENERATION_QUEUE)
    generation_tree = process_tree(generation)
    killed_at = time.monotonic()
    os.kill(generation, signal.SIGKILL)
    wait_until(
        lambda: _replaced(settings.GENERATION_QUEUE, generation), 60, "a new generation worker"
    )
    generation_back_s = time.monotonic() - killed_at
    response = requests.post(f"{url}/txt2img", json=TXT2IMG, timeout=TIMEOUT_S)
    accepted_s = time.monotonic() - killed_at
    assert response.status_code == 200, response.text
    assert still_running(generation_tree) == []

    # The web server itself: started again too.
    poller.stopping.set()
    poller.join()
    web = _web_server_pid(serve.pid)
    web_tree = process_tree(web)
    killed_at = time.monotonic()
    os.kill(web, signal.SIGKILL)

    def answers() -> bool:
        try:
            return requests.get(f"{url}/list_sessions", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    # Its own workers go with it (they could answer for a moment: they hold the socket).
    wait_until(lambda: not still_running(web_tree), 10, "the killed web server's workers to end")
    wait_until(answers, 60, "the web server to answer again", interval=0.2)
    web_back_s = time.monotonic() - killed_at
    assert _web_server_pid(serve.pid) != web

    assert serve.process.poll() is None, serve.log()
    assert poller.answers and set(poller.answers) == {200}, poller.answers
    assert serve.log().count("starting it again") == 3, serve.log()
    # One row per queue: the killed workers' rows are pruned.
    assert sorted(WorkerHeartbeat.objects.values_list("queue", flat=True)) == sorted(
        [settings.GENERATION_QUEUE, settings.TRAINING_QUEUE]
    )
    tree = process_tree(serve.pid)
    serve.process.send_signal(signal.SIGTERM)
    assert serve.process.wait(timeout=60) == 0, serve.log()
    wait_until(lambda: not still_running(tree), 10, "serve's processes to end")
    assert processes_with_env("SDXL_QUEUE_NAMESPACE", settings.SDXL_QUEUE_NAMESPACE) == []
    print(
        f"training worker beating again {training_back_s:.1f}s after kill -9; generation "
        f"worker {generation_back_s:.1f}s, /txt2img answered 200 {accepted_s:.1f}s after; "
        f"web server answering again {web_back_s:.1f}s after kill -9; "
        f"{len(poller.answers)} GET /list_sessions meanwhile, all 200"
    )
