"""GET /runs/<id>/events under the real web server (gunicorn, uvicorn workers): a run's
stream carries every event of the run in order and ends; a dropped stream resumed with
Last-Event-ID loses and repeats nothing; 200 open streams leave the other endpoints
answering in under a second (issue 32), and all end on the run's cancel."""

import json
import os
import signal
import socket
import time

import pytest
import requests

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.processes import children_of, wait_until
from training_app.models import Event, TrainingRun
from training_app.services import runs as run_services

pytestmark = pytest.mark.e2e

# Every kind of event on the tiny model: 4 steps, a sample and a checkpoint at step 2.
RUN = {"steps": 4, "resolution": 64, "batch_size": 2, "seed": 1}
RUN |= {"sample_every": 2, "checkpoint_every": 2}
STREAMS = 200
LIMIT_S = 1.0
RUN_TIMEOUT_S = 180


def _session_with_images() -> int:
    session = session_services.session_create()
    for color in ("red", "green"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64), color), color)
    return session.pk


def _read_events(response: requests.Response, count: int | None = None) -> list[dict]:
    """The stream's events as {"id", "event", "data"}, up to `count` of them or its end."""
    events: list[dict] = []
    fields: dict[str, str] = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "event" in fields:
                events.append(
                    {"id": int(fields["id"]), "event": fields["event"], "data": fields["data"]}
                )
                if len(events) == count:
                    break
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return events


def test_a_runs_stream_sees_every_event_in_order_and_resumes_without_loss(service_processes):
    url = service_processes.gunicorn()
    service_processes.worker("training")
    run = run_services.training_run_start(_session_with_images(), RUN)

    # Dropped after its first two events...
    with requests.get(f"{url}/runs/{run.pk}/events", stream=True, timeout=RUN_TIMEOUT_S) as first:
        assert first.headers["content-type"] == "text/event-stream"
        before = _read_events(first, 2)
    # ...and resumed from the last one seen, until the server ends it.
    resumed = requests.get(
        f"{url}/runs/{run.pk}/events",
        headers={"Last-Event-ID": str(before[-1]["id"])},
        stream=True,
        timeout=RUN_TIMEOUT_S,
    )
    after = _read_events(resumed)

    seen = before + after
    recorded = list(Event.objects.filter(run=run).order_by("id"))
    assert [(event["id"], event["event"]) for event in seen] == [
        (event.pk, event.name) for event in recorded
    ]
    names = [event["event"] for event in seen]
    assert names[0] == "started" and names[-1] == "completed"
    assert {"progress", "sample", "checkpoint"} <= set(names)
    # Bodies as webhooks post them, in the order of the run's steps.
    bodies = [json.loads(event["data"]) for event in seen]
    assert all(body["type"] == "training" and body["id"] == run.pk for body in bodies)
    assert [body["event"] for body in bodies] == names
    progress = [body["data"]["step"] for body in bodies if body["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == RUN["steps"]

    # A stream of the ended run replays it all and ends; one past its last id ends empty.
    replayed = _read_events(requests.get(f"{url}/runs/{run.pk}/events", stream=True, timeout=30))
    assert replayed == seen
    past_end = requests.get(
        f"{url}/runs/{run.pk}/events?last_event_id={seen[-1]['id']}", timeout=30
    )
    assert past_end.status_code == 200 and "event:" not in past_end.text
    assert requests.get(f"{url}/runs/{run.pk + 1000}/events", timeout=30).status_code == 404


def _open_stream(port: int, path: str) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return client


def _process_usage(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kib / 1024, (int(fields[11]) + int(fields[12])) / ticks


def test_200_open_streams_leave_the_other_endpoints_answering(service_processes, capsys):
    # No training worker: the run stays queued and its 200 streams open until its cancel.
    url = service_processes.gunicorn(workers=1)
    port = int(url.rpartition(":")[2])
    session_id = _session_with_images()
    run = run_services.training_run_start(session_id, RUN)
    (web_pid,) = _children(service_processes.started[0].pid)  # gunicorn's one worker
    memory_before, cpu_before = _process_usage(web_pid)

    streams = [_open_stream(port, f"/runs/{run.pk}/events") for _ in range(STREAMS)]
    for stream in streams:  # each answered (its head): all 200 are open at once
        assert stream.recv(4096).startswith(b"HTTP/1.1 200")
    opened = time.monotonic()

    timings: dict[str, list[float]] = {}
    calls = {
        "GET /healthz": lambda: requests.get(f"{url}/healthz", timeout=30),
        "GET /list_sessions": lambda: requests.get(f"{url}/list_sessions", timeout=30),
        "POST /train_status": lambda: requests.post(
            f"{url}/train_status", json={"session_id": session_id}, timeout=30
        ),
    }
    for _ in range(5):
        for name, call in calls.items():
            before = time.monotonic()
            assert call().status_code == 200
            timings.setdefault(name, []).append(round(time.monotonic() - before, 3))
    memory_open, cpu_open = _process_usage(web_pid)
    held_s = time.monotonic() - opened
    with capsys.disabled():
        print(
            f"\n200 streams: web process {memory_before:.0f} -> {memory_open:.0f} MiB, "
            f"{cpu_open - cpu_before:.2f} CPU s over {held_s:.1f} s open; answers {timings}"
        )
    assert all(max(times) < LIMIT_S for times in timings.values()), timings

    # The cancel ends every stream, each with the run's "cancelled" event.
    assert (
        requests.post(
            f"{url}/cancel_training", json={"session_id": session_id}, timeout=30
        ).status_code
        == 200
    )
    for stream in streams:
        received = b""
        while not received.endswith(b"0\r\n\r\n"):  # the chunked body's end
            chunk = stream.recv(65536)
            assert chunk, "the stream closed before its end"
            received += chunk
        assert b"event: cancelled\n" in received
        stream.close()
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.CANCELLED


def _children(pid: int) -> list[int]:
    wait_until(lambda: children_of(pid), 30, "gunicorn's worker")
    return children_of(pid)


def test_a_stopping_server_ends_its_streams_cleanly(service_processes):
    """gunicorn's stop (SIGTERM) ends an open stream with the end of its body, for its
    client to resume elsewhere, rather than waiting on it until the graceful timeout kills
    the worker mid-answer."""
    url = service_processes.gunicorn(workers=1)
    run = run_services.training_run_start(_session_with_images(), RUN)  # stays queued
    stream = _open_stream(int(url.rpartition(":")[2]), f"/runs/{run.pk}/events")
    assert stream.recv(4096).startswith(b"HTTP/1.1 200")

    server = service_processes.started[0].process
    server.send_signal(signal.SIGTERM)
    received = b""
    while chunk := stream.recv(65536):
        received += chunk
    assert received.endswith(b"0\r\n\r\n"), received  # the chunked body's end
    assert server.wait(timeout=60) == 0
