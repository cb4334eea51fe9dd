"""The event streams as `serve`'s web server serves them (SyncRequests routes them before
Django's slots, to sdxl_service.event_streams), driven in-process through ASGI: the token
rules and owners, replay then end, and no slot taken while a stream is open."""

import asyncio
import json

import pytest

from sdxl_service.web_server import SyncRequests
from training_app.services.generations import lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.django_db(transaction=True)  # the stream reads on its own thread
TOKEN = "events-test-token"


async def _django_refuses(scope, receive, send):
    raise AssertionError(f"{scope['path']} reached Django")


async def _get(
    path: str, headers: dict[str, str], until_closed_s: float = 10, method: str = "GET"
) -> list[dict]:
    """GETs `path` through SyncRequests (no slot free: Django may not be reached); the ASGI
    messages sent back, up to the answer's end."""
    sent: list[dict] = []
    disconnect = asyncio.Event()

    async def receive() -> dict:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
    }
    gate = SyncRequests(_django_refuses, threads=0)
    await asyncio.wait_for(gate(scope, receive, send), until_closed_s)
    return sent


def _body(sent: list[dict]) -> bytes:
    return b"".join(message.get("body", b"") for message in sent[1:])


@pytest.fixture
def tokens(settings):
    settings.SDXL_API_TOKENS = [TOKEN]
    settings.SDXL_EVENTS_POLL_S = 0.05


def test_a_token_is_needed_and_an_unknown_id_is_a_404(tokens, generation_worker):
    refused = asyncio.run(_get("/runs/1/events", {}))
    assert refused[0]["status"] == 401
    assert json.loads(_body(refused))["status"] == "error"
    wrong = asyncio.run(_get("/runs/1/events", {"Authorization": "Bearer nope"}))
    assert wrong[0]["status"] == 401
    generation = generation_request(GenerationRequest(prompt="x"))
    unknown = asyncio.run(
        _get(f"/generations/{generation.pk + 1}/events", {"Authorization": f"Bearer {TOKEN}"})
    )
    assert unknown[0]["status"] == 404


def test_an_ended_generation_replays_its_events_and_ends_without_a_slot(tokens, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x"))
    lifecycle.generation_cancel(generation.pk)
    sent = asyncio.run(
        _get(f"/generations/{generation.pk}/events/", {"Authorization": f"Bearer {TOKEN}"})
    )
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream") in sent[0]["headers"]
    body = _body(sent).decode()
    assert body.startswith("id: ") and "\nevent: cancelled\ndata: {" in body
    assert body.endswith("\n\n") and body.count("event: ") == 1
    assert sent[-1] == {"type": "http.response.body", "body": b""}  # closed by the server

    resumed = asyncio.run(
        _get(
            f"/generations/{generation.pk}/events",
            {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": body.split()[1]},
        )
    )
    assert "event:" not in _body(resumed).decode()


def test_a_head_of_a_live_stream_is_answered_at_once(tokens, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x"))  # queued: it goes on
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sent = asyncio.run(_get(f"/generations/{generation.pk}/events", auth, method="HEAD"))
    assert sent[0]["status"] == 200 and _body(sent) == b""


def test_a_quiet_stream_sends_heart_beats_and_ends_when_its_client_leaves(
    tokens, settings, generation_worker
):
    settings.SDXL_EVENTS_HEARTBEAT_S = 0.1
    generation = generation_request(GenerationRequest(prompt="x"))  # queued: no event yet
    sent: list[dict] = []
    left = asyncio.Event()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if _body(sent).count(b": ping\n\n") == 2:
            left.set()  # the client leaves after two heart-beats

    async def follow() -> None:
        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/generations/{generation.pk}/events",
            "query_string": b"",
            "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        }
        await asyncio.wait_for(SyncRequests(_django_refuses, threads=0)(scope, receive, send), 10)

    asyncio.run(follow())
    assert sent[0]["status"] == 200 and _body(sent) == b": ping\n\n" * 2
