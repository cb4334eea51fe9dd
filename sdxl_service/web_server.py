"""The web server `manage.py serve` runs: gunicorn's process management, each process
reading requests on one asyncio event loop (uvicorn, httptools) and handing them to
Django's ASGI application through SyncRequests.

What a client costs, and for how long:

- Reading the request head (request line and headers) costs a protocol object and a
  socket: no thread, no coroutine. HttpProtocol gives the head HEAD_TIMEOUT_S from the
  connection's start (or from the first byte of the next request on a kept-alive
  connection) and at most MAX_HEAD_BYTES; past either the client gets 408 or 431 and the
  connection is closed. An idle kept-alive connection is closed after the keep-alive time
  (gunicorn's --keep-alive).
- Reading the body costs a coroutine (and the body's bytes, in memory up to
  FILE_UPLOAD_MAX_MEMORY_SIZE, then in a temporary file): Django's ASGI handler reads it
  on the event loop through SyncRequests, which holds it to web_requests.body_limit()
  (413, at once when the Content-Length says more) and to a deadline that grows with
  what has arrived (BODY_TIMEOUT_S, then BODY_MIN_RATE bytes per second: 408 past it).
- Only then does the request wait for one of `threads` slots per process (gunicorn's
  --threads): Django runs a synchronous view on a thread of its own per request, with its
  own database connection, so the slots bound both. The slot is held until Django is done
  with the request, its answer sent included (a thread-sensitive context waits for its
  thread).

Async endpoints belong beside Django in SyncRequests.__call__, routed before the body is
read: they run on the event loop and must not take a slot for as long as they stream. The
event streams (GET /runs/<id>/events, /generations/<id>/events: sdxl_service.event_streams)
are served there.
"""

from __future__ import annotations

import asyncio
import http
import re
import resource
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

from core.processes import die_with_parent
from sdxl_service.api.client_gone import CLIENT_GONE
from sdxl_service.web_requests import body_limit, error_json, too_big_body

# ASGI's callables, as loosely as Django's ASGIHandler takes them.
Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Application = Callable[[Scope, Receive, Send], Awaitable[None]]

# A request head must arrive whole within this many seconds, and be at most this large.
HEAD_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
# A body's deadline: BODY_TIMEOUT_S after its first byte was awaited, plus one second per
# BODY_MIN_RATE bytes received (Apache mod_reqtimeout's rule): a client sending a byte at a
# time is cut off after ~BODY_TIMEOUT_S; one sending at least BODY_MIN_RATE bytes/s never.
BODY_TIMEOUT_S = 20.0
BODY_MIN_RATE = 500
# The event streams' URLs (sdxl_service.event_streams serves them), and the scope's key of
# the event set when the server stops: a stream then ends, so that the stop does not wait
# gunicorn's graceful timeout for it (its client resumes with Last-Event-ID).
EVENTS_PATH = re.compile(r"^/(runs|generations)/([0-9]+)/events/?$")
SERVER_STOPPING = "sdxl.server_stopping"


class BodyTooBig(Exception):
    """The request body grew past body_limit()."""


class BodyTimedOut(Exception):
    """The request body did not arrive within its deadline."""


class SyncRequests:
    """ASGI middleware in front of Django's ASGIHandler: a request's body is read on the
    event loop (bounded in size and time), then the request waits for a slot (at most
    `threads` at once in Django per process), and the client's disconnect sets the
    request's CLIENT_GONE event (the module's docstring says why)."""

    def __init__(self, django_application: Application, threads: int) -> None:
        self.django_application = django_application
        self.allow(threads)

    def allow(self, threads: int) -> None:
        """At most `threads` requests in Django at once (WebWorker: gunicorn's --threads)."""
        self.slots = asyncio.Semaphore(threads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a WebSocket: Django refuses it
            await self.django_application(scope, receive, send)
            return
        events_of = _event_stream_route(scope)
        if events_of is not None:  # a stream: on the event loop, without a slot
            # Imported here: it reads models, and this module loads before Django is set up.
            from sdxl_service.event_streams import event_stream

            stopping = scope[SERVER_STOPPING] = asyncio.Event()  # HttpProtocol's scope too
            await event_stream(scope, receive, send, *events_of, stopping)
            return
        content_type = _header(scope, b"content-type") or ""
        limit = body_limit(content_type)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_big_body(content_type))
            return
        request = _GatedRequest(scope, receive, self.slots, limit)
        try:
            await self.django_application(request.scope, request.receive, send)
        except BodyTooBig:
            await _answer(send, 413, too_big_body(content_type))
        except BodyTimedOut:
            message = "the request body did not arrive in time: send it faster"
            await _answer(send, 408, error_json(message))
        finally:
            if request.holds_slot:
                self.slots.release()


class _GatedRequest:
    """One request's scope and receive() as Django sees them: the body's messages, counted
    and timed; the last one handed over once a slot is free; after it, the client's
    disconnect, which also sets the scope's CLIENT_GONE event."""

    def __init__(self, scope: Scope, receive: Receive, slots: asyncio.Semaphore, limit: int):
        self._receive, self._slots, self._limit = receive, slots, limit
        self.client_gone = threading.Event()
        self.scope = {**scope, CLIENT_GONE: self.client_gone}
        self.holds_slot = False
        self._body_read = False
        self._received = 0
        self._started = time.monotonic()

    async def receive(self) -> Message:
        if self._body_read:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.client_gone.set()
            return message
        deadline = self._started + BODY_TIMEOUT_S + self._received / BODY_MIN_RATE
        try:
            message = await asyncio.wait_for(self._receive(), deadline - time.monotonic())
        except TimeoutError:
            raise BodyTimedOut from None
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise BodyTooBig
            if not message.get("more_body", False):
                self._body_read = True
                self._tell_length()
                await self._slots.acquire()
                self.holds_slot = True
        return message

    def _tell_length(self) -> None:
        """A body sent without a Content-Length (chunked) gets one, its size: DRF reads no
        body without it, and Django applies its limits by it. Django builds its request
        from the scope once it has read the body (ASGIHandler.handle), so it sees this."""
        if self._received and _header(self.scope, b"content-length") is None:
            length = (b"content-length", str(self._received).encode())
            self.scope["headers"] = [*self.scope.get("headers", []), length]


def _event_stream_route(scope: Scope) -> tuple[Literal["run", "generation"], int] | None:
    """(kind, id) when the request is a GET (or HEAD) of an events URL, else None."""
    if scope.get("method") not in ("GET", "HEAD"):
        return None
    matched = EVENTS_PATH.match(scope.get("path", ""))
    if matched is None:
        return None
    return ("run" if matched[1] == "runs" else "generation"), int(matched[2])


def _header(scope: Scope, name: bytes) -> str | None:
    for header, value in scope.get("headers", []):
        if header == name:
            return bytes(value).decode("latin-1")
    return None


async def _answer(send: Send, status: int, body: bytes) -> None:
    """A JSON answer that closes the connection: the rest of the body is never read."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline (HEAD_TIMEOUT_S) and a size limit
    (MAX_HEAD_BYTES) on each request's head, which uvicorn leaves unbounded."""

    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._head_started()

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: an event stream in progress is told to end (SERVER_STOPPING);
        any other request finishes, and its connection closes after it."""
        if self.cycle is not None and not self.cycle.response_complete:
            stopping = self.cycle.scope.get(SERVER_STOPPING)
            if isinstance(stopping, asyncio.Event):
                stopping.set()
        super().shutdown()

    def _head_started(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined head: close after the answer
        else:
            self._refuse(http.HTTPStatus.REQUEST_TIMEOUT)

    def _refuse(self, status: http.HTTPStatus) -> None:
        self._head_done()
        if self.transport.is_closing():
            return
        body = status.phrase.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status.value, status.phrase.encode(), len(body), body)
        )
        self.transport.close()


class WebWorker(UvicornWorker):  # type: ignore[misc]
    """gunicorn's uvicorn worker with HttpProtocol; gunicorn's --threads is the number of
    requests the application lets into Django at once (SyncRequests.allow), and the
    process may hold as many sockets as the system allows (RLIMIT_NOFILE raised to its
    hard limit: each waiting client holds one)."""

    # No lifespan: Django has none to run.
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": HttpProtocol, "lifespan": "off"}

    def init_process(self) -> None:
        # gunicorn's threaded workers leave once their master is gone (they compare its pid
        # as they loop); uvicorn's never look, and lived on as orphans after a kill -9 of
        # the master (~500 MB each, the listening socket still open). The kernel ends this
        # one with its master instead.
        die_with_parent(self.ppid)
        super().init_process()

    def run(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if isinstance(self.wsgi, SyncRequests):
            self.wsgi.allow(self.cfg.threads)
        super().run()
