"""Event streams: the SSE parser, resuming a dropped stream with Last-Event-ID, and the
polling fallback on a server without event streams."""

import asyncio
import json

import httpx
import pytest
from sdxl_client import AsyncSDXLClient, SDXLClient
from sdxl_client._common import MAX_RECONNECTS
from sdxl_client.events import parse_lines


def _sse(event_id: int, name: str, data: dict) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


def _run_events(run_id: int) -> list[tuple[int, str]]:
    names = ["started", "progress", "sample", "checkpoint", "progress", "completed"]
    return list(enumerate(names, start=1))


def _body(name: str, run_id: int) -> dict:
    return {"event": name, "type": "training", "id": run_id, "data": {"session_id": "3"}}


def test_the_parser_reads_ids_names_data_and_skips_comments():
    text = (
        ": ping\n\n"
        'id: 1\nevent: started\ndata: {"event": "started"}\n\n'
        'id: 2\r\nevent: progress\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
        "event: nothing-without-data\n\n"
        'data: {"b": 2}\n\n'
    )
    events = list(parse_lines(text.splitlines(keepends=True)))
    assert [(e.id, e.name) for e in events] == [(1, "started"), (2, "progress"), (0, "message")]
    assert events[0].data == {"event": "started"}
    assert events[1].data == {"a": 1}
    assert events[2].data == {"b": 2}


async def _async(chunks):
    for chunk in chunks:
        yield chunk


class _DroppingServer:
    """Serves a run's events; the first connection breaks after two events (the body
    ends in the middle of the third), later ones resume after Last-Event-ID."""

    def __init__(self, run_id: int, asynchronous: bool = False) -> None:
        self.run_id = run_id
        self.asynchronous = asynchronous
        self.last_event_ids: list[str | None] = []

    def _chunks(self, after: int, drop: bool):
        sent = 0
        for event_id, name in _run_events(self.run_id):
            if event_id <= after:
                continue
            text = _sse(event_id, name, _body(name, self.run_id))
            if drop and sent == 2:
                yield text[:12].encode()
                raise httpx.ReadError("connection reset")
            yield b": ping\n\n"
            yield text.encode()
            sent += 1

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/runs/{self.run_id}/events":
            last = request.headers.get("Last-Event-ID")
            self.last_event_ids.append(last)
            body = self._chunks(int(last or 0), drop=len(self.last_event_ids) == 1)
            if self.asynchronous:
                body = _async(body)
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body)
        if request.url.path == "/train_status":
            return httpx.Response(200, json={"status": "completed", "progress": 100})
        return httpx.Response(404, json={"status": "error", "message": "not found"})


def test_a_dropped_stream_resumes_from_the_last_event_without_losing_one():
    server = _DroppingServer(run_id=7)
    seen = []
    client = SDXLClient(
        "http://api", transport=httpx.MockTransport(server.handler), poll_interval=0
    )
    with client:
        final = client.wait_for_run(7, on_event=seen.append)
    assert [(e.id, e.name) for e in seen] == _run_events(7)
    assert server.last_event_ids == [None, "2"]
    assert final == {"status": "completed", "progress": 100}


def test_the_async_client_resumes_as_well():
    server = _DroppingServer(run_id=8, asynchronous=True)

    async def collect():
        transport = httpx.MockTransport(server.handler)
        async with AsyncSDXLClient("http://api", transport=transport, poll_interval=0) as client:
            return [(e.id, e.name) async for e in client.run_events(8, last_event_id=1)]

    assert asyncio.run(collect()) == _run_events(8)[1:]
    assert server.last_event_ids == ["1", "3"]


def test_without_event_streams_a_generation_is_polled():
    answers = iter(
        [
            {"generation_id": 5, "status": "queued"},
            {"generation_id": 5, "status": "running", "step": 2, "total_steps": 4},
            {"generation_id": 5, "status": "completed", "image_urls": ["/generations/5/0.png"]},
        ]
    )
    last: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generations/5":
            last.update(next(answers, last))
            return httpx.Response(200, json=last)
        if request.url.path == "/generations/5/0.png":
            return httpx.Response(200, content=b"png")
        return httpx.Response(404, json={"status": "error", "message": "Not found."})

    with SDXLClient(
        "http://api", transport=httpx.MockTransport(handler), poll_interval=0
    ) as client:
        names = [event.name for event in client.generation_events(5)]
        assert names == ["started", "progress", "completed"]


def test_without_event_streams_a_run_is_polled_through_train_status():
    statuses = iter(
        [
            {"status": "in-progress", "queued": True, "step": 0, "samples": []},
            {"status": "in-progress", "queued": False, "step": 3, "samples": [{"step": 3}]},
            {"status": "completed", "progress": 100, "samples": [{"step": 3}], "lora": "l.st"},
        ]
    )
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/train_status":
            asked.append(json.loads(request.content))
            return httpx.Response(200, json=next(statuses))
        return httpx.Response(404, json={"status": "error", "message": "Not found."})

    transport = httpx.MockTransport(handler)
    with SDXLClient("http://api", transport=transport, poll_interval=0) as client:
        events = list(client.run_events(9, session_id=3))
    assert [e.name for e in events] == ["started", "sample", "progress", "completed"]
    assert events[-1].data["data"]["run_id"] == 9
    assert asked[0] == {"session_id": 3}


def test_an_error_answer_of_the_events_url_is_raised():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401, json={"status": "error", "message": "the API token is not valid"}
        )

    from sdxl_client import SDXLError

    with SDXLClient("http://api", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(SDXLError) as raised:
            list(client.run_events(1, session_id=1))
    assert raised.value.status == 401


def test_a_stream_that_keeps_closing_empty_is_given_up():
    opened = []

    def handler(request: httpx.Request) -> httpx.Response:
        opened.append(request.headers.get("Last-Event-ID"))
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=b"")

    from sdxl_client import SDXLError

    transport = httpx.MockTransport(handler)
    with SDXLClient("http://api", transport=transport, poll_interval=0) as client:
        with pytest.raises(SDXLError, match="keeps closing"):
            list(client.generation_events(4, last_event_id=9))
    assert opened == ["9"] * (1 + MAX_RECONNECTS)
