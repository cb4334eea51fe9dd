"""SyncRequests, the gate in front of Django's ASGI application, with a stand-in for
Django: bodies bounded in size and time before any slot is taken, at most `threads`
requests inside at once, and the client's disconnect set on the request's event."""

import asyncio
import json

import pytest

from sdxl_service import web_server
from sdxl_service.api.client_gone import CLIENT_GONE

LIMIT = 1024 * 1024  # 1 MB


@pytest.fixture(autouse=True)
def small_limits(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT
    settings.SDXL_MAX_UPLOAD_MB = 0


class Client:
    """One request's ASGI side: the messages it sends, and what came back."""

    def __init__(self, *messages: dict, content_length: int | None = None) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        for message in messages:
            self.messages.put_nowait(message)
        headers = [] if content_length is None else [(b"content-length", b"%d" % content_length)]
        self.scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        self.sent: list[dict] = []

    async def receive(self) -> dict:
        return await self.messages.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    def body(self) -> dict:
        return json.loads(self.sent[1]["body"])


def _part(body: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


class StandIn:
    """Django's part: reads the body, then holds its slot until told to answer."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.release = asyncio.Event()
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        while (await receive())["more_body"]:
            pass
        self.scopes.append(scope)
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        await self.release.wait()
        self.inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_no_more_than_threads_requests_inside_at_once():
    async def scenario():
        django = StandIn()
        gate = web_server.SyncRequests(django, threads=2)
        clients = [Client(_part(b"{}")) for _ in range(5)]
        calls = [asyncio.create_task(gate(c.scope, c.receive, c.send)) for c in clients]
        await asyncio.sleep(0.05)
        assert django.inside == 2
        django.release.set()
        await asyncio.gather(*calls)
        return django, clients

    django, clients = asyncio.run(scenario())
    assert django.most_inside == 2
    assert [client.status for client in clients] == [200] * 5


def test_a_slow_body_takes_no_slot():
    async def scenario():
        django = StandIn()
        gate = web_server.SyncRequests(django, threads=1)
        slow = Client(_part(b"{", more=True))  # the rest never comes
        fast = Client(_part(b"{}"))
        slow_call = asyncio.create_task(gate(slow.scope, slow.receive, slow.send))
        await asyncio.sleep(0.05)
        django.release.set()
        await asyncio.wait_for(gate(fast.scope, fast.receive, fast.send), 5)
        slow_call.cancel()
        return fast

    assert asyncio.run(scenario()).status == 200


def test_a_declared_or_grown_body_past_the_limit_is_413_unread():
    async def scenario(client):
        django = StandIn()
        await web_server.SyncRequests(django, threads=1)(client.scope, client.receive, client.send)
        return django

    declared = Client(content_length=LIMIT + 1)  # sends nothing: never read
    assert asyncio.run(scenario(declared)).scopes == []
    chunked = Client(_part(b" " * LIMIT, more=True), _part(b" "))
    assert asyncio.run(scenario(chunked)).scopes == []
    for client in (declared, chunked):
        assert client.status == 413
        assert (b"connection", b"close") in client.sent[0]["headers"]
        assert client.body()["message"] == "request body is larger than the limit of 1 MB"


def test_a_body_past_its_deadline_is_408(monkeypatch):
    monkeypatch.setattr(web_server, "BODY_TIMEOUT_S", 0.1)
    client = Client(_part(b"{", more=True))
    asyncio.run(
        web_server.SyncRequests(StandIn(), threads=1)(client.scope, client.receive, client.send)
    )
    assert client.status == 408
    assert "did not arrive in time" in client.body()["message"]


def test_the_clients_disconnect_sets_its_event():
    async def scenario():
        seen = []

        async def django(scope, receive, send):
            await receive()  # the body
            gone = scope[CLIENT_GONE]
            seen.append(gone.is_set())
            assert (await receive())["type"] == "http.disconnect"
            seen.append(gone.is_set())

        client = Client(_part(b"{}"), {"type": "http.disconnect"})
        await web_server.SyncRequests(django, threads=1)(client.scope, client.receive, client.send)
        return seen

    assert asyncio.run(scenario()) == [False, True]


def test_a_chunked_body_is_handed_on_with_its_length():
    django = StandIn()
    django.release.set()
    client = Client(_part(b'{"a": ', more=True), _part(b"1}"))
    asyncio.run(
        web_server.SyncRequests(django, threads=1)(client.scope, client.receive, client.send)
    )
    (scope,) = django.scopes
    assert (b"content-length", b"8") in scope["headers"]
