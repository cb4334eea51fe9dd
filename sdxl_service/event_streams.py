"""GET /runs/<id>/events and /generations/<id>/events under `serve`: Server-Sent Events
served on the web process's event loop (SyncRequests routes them here before Django's
slots), so an open stream costs a socket and a coroutine, never a thread or a slot.

One poller per process (EventHub) reads the events of every watched run and generation
every SDXL_EVENTS_POLL_S, two queries per kind (states, new events), on one thread of its
own (one database connection), and wakes the streams it has news for: 200 streams cost
the same queries a poll as one. Authentication and the owner check (a token with the "read" scope;
404 for another owner's id) run on that thread too, before the answer starts.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs

from django.conf import settings
from django.db import close_old_connections

from access_app.callers import OPEN_CALLER, Caller
from access_app.selectors import api_token_caller, api_tokens_configured
from core.errors import ServiceError
from training_app.services.events import (
    HEARTBEAT,
    Kind,
    RecordedEvent,
    StreamCursor,
    SubjectEvents,
    event_subject_check,
    events_after,
    last_event_id,
    sse_event,
)

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
T = TypeVar("T")


class _Watcher:
    def __init__(self, after: int) -> None:
        self.cursor = StreamCursor(after)
        self.news = asyncio.Event()
        self.pending: list[RecordedEvent] = []


class EventHub:
    """The process's poller of the event table for its open streams (module docstring)."""

    def __init__(self) -> None:
        # One thread: one database connection for every stream of the process.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-streams")
        self.watchers: dict[tuple[Kind, int], set[_Watcher]] = {}
        self.task: asyncio.Task[None] | None = None

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, _with_connection, function, *args
        )

    def watch(self, key: tuple[Kind, int], after: int) -> _Watcher:
        watcher = _Watcher(after)
        self.watchers.setdefault(key, set()).add(watcher)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._poll())
        return watcher

    def unwatch(self, key: tuple[Kind, int], watcher: _Watcher) -> None:
        watchers = self.watchers.get(key, set())
        watchers.discard(watcher)
        if not watchers:
            self.watchers.pop(key, None)

    async def _poll(self) -> None:
        while self.watchers:
            asked = {
                key: min(watcher.cursor.after for watcher in watchers)
                for key, watchers in self.watchers.items()
            }
            try:
                found = await self.in_thread(events_after, asked)
            except Exception:  # the database is away: the streams wait, the next poll retries
                found = {}
            for key, state in found.items():
                for watcher in self.watchers.get(key, set()):
                    # One that came while the query ran may need older events: next poll.
                    if watcher.cursor.after >= asked[key]:
                        self._tell(watcher, state)
            await asyncio.sleep(settings.SDXL_EVENTS_POLL_S)

    @staticmethod
    def _tell(watcher: _Watcher, state: SubjectEvents) -> None:
        news = watcher.cursor.take(state)
        watcher.pending.extend(news)
        if news or watcher.cursor.ended:
            watcher.news.set()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventHub] = weakref.WeakKeyDictionary()


def _hub() -> EventHub:
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = EventHub()
    return _hubs[loop]


def _with_connection(function: Callable[..., T], *args: Any) -> T:
    """`function` with the thread's database connection checked before and after, as
    Django does around a request (a broken or too old one is replaced)."""
    close_old_connections()
    try:
        return function(*args)
    finally:
        close_old_connections()


def events_caller(authorization: str | None) -> Caller:
    """The caller as the API's authentication and "read" scope decide (401, 403)."""
    if not api_tokens_configured():
        return OPEN_CALLER
    if not authorization:
        raise ServiceError("this API needs a token: send 'Authorization: Bearer <token>'", 401)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ServiceError("the Authorization header must read 'Bearer <token>'", 401)
    caller = api_token_caller(token)
    if caller is None:
        raise ServiceError("the API token is not valid", 401)
    if not caller.may("read"):
        raise ServiceError("this API token lacks the 'read' scope this endpoint needs", 403)
    return caller


def _stream_start(kind: Kind, subject_id: int, headers: dict[bytes, str], query: str) -> int:
    """Authenticates, checks the subject, and returns the id to start after."""
    caller = events_caller(headers.get(b"authorization"))
    event_subject_check(kind, subject_id, caller)
    asked = parse_qs(query).get("last_event_id", [None])[-1]
    return last_event_id(headers.get(b"last-event-id"), asked)


async def event_stream(
    scope: Scope,
    receive: Receive,
    send: Send,
    kind: Kind,
    subject_id: int,
    server_stopping: asyncio.Event,
) -> None:
    """Answers one events request: an error, or the stream until its terminal event, the
    client's disconnect, or `server_stopping` (then it ends early; the client resumes)."""
    from sdxl_service.web_requests import error_json

    hub = _hub()
    headers = {name: bytes(value).decode("latin-1") for name, value in scope.get("headers", [])}
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    try:
        after = await hub.in_thread(_stream_start, kind, subject_id, headers, query)
    except ServiceError as error:
        body = await hub.in_thread(error_json, error.message)
        extra = [(b"www-authenticate", b'Bearer realm="api"')] if error.status == 401 else []
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once
            ],
        }
    )
    if scope.get("method") == "HEAD":  # the head alone, at once
        await send({"type": "http.response.body", "body": b""})
        return
    key = (kind, subject_id)
    watcher = hub.watch(key, after)
    gone = asyncio.ensure_future(_disconnected(receive))
    stopping = asyncio.ensure_future(server_stopping.wait())
    try:
        while True:
            news = asyncio.ensure_future(watcher.news.wait())
            done, _ = await asyncio.wait(
                {news, gone, stopping},
                timeout=settings.SDXL_EVENTS_HEARTBEAT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            news.cancel()
            if gone in done:
                return
            if stopping in done:  # the server stops: ended here, resumed elsewhere
                await send({"type": "http.response.body", "body": b""})
                return
            if not done:
                await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                continue
            watcher.news.clear()
            pending, watcher.pending = watcher.pending, []
            for event_id, name, payload in pending:
                await send(
                    {
                        "type": "http.response.body",
                        "body": sse_event(event_id, name, payload),
                        "more_body": True,
                    }
                )
            if watcher.cursor.ended:
                await send({"type": "http.response.body", "body": b""})
                return
    finally:
        gone.cancel()
        stopping.cancel()
        hub.unwatch(key, watcher)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
