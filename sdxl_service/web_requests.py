"""What the web process holds every request to, under either entry point: the ASGI
application `serve` runs (sdxl_service.asgi, under gunicorn's uvicorn workers) and the
WSGI one (sdxl_service.wsgi: Django's runserver, or gunicorn's own workers run by hand).

Two things differ here from the workers, which load the same settings:

- a request waits at most SDXL_WEB_DB_LOCK_TIMEOUT for a database lock (503 after it,
  sdxl_service.api.errors), where workers keep waiting 30 s so their writes are not lost;
- a body is held to body_limit() as it arrives: Django applies its limits to a body by its
  Content-Length, and reads one sent without (chunked) whole, whatever its size.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, cast

from django.conf import settings
from django.http import StreamingHttpResponse

if TYPE_CHECKING:
    from django.http import HttpRequest
    from django.http.response import HttpResponseBase


def use_web_lock_timeout() -> None:
    """The web server's wait for a lock: SQLite's busy timeout, PostgreSQL's lock_timeout.
    Set before the first connection opens (each reads its OPTIONS when it connects)."""
    database = settings.DATABASES["default"]
    options = database.setdefault("OPTIONS", {})
    if database["ENGINE"] == "django.db.backends.sqlite3":
        options["timeout"] = settings.SDXL_WEB_DB_LOCK_TIMEOUT
    elif database["ENGINE"] == "django.db.backends.postgresql":
        lock_timeout = f"-c lock_timeout={int(settings.SDXL_WEB_DB_LOCK_TIMEOUT * 1000)}"
        options["options"] = f"{options.get('options', '')} {lock_timeout}".strip()


def body_limit(content_type: str) -> int:
    """The most a request body of `content_type` may hold, as Django and the upload handler
    hold a body with a Content-Length to it: SDXL_MAX_UPLOAD_MB for a multipart body (its
    files), SDXL_MAX_BODY_MB for any other (JSON)."""
    if _multipart(content_type):
        return int(settings.SDXL_MAX_UPLOAD_MB * 1024 * 1024)
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


def too_big_body(content_type: str) -> bytes:
    """The 413's JSON body for a request body past body_limit(content_type), worded as
    Django's own answer (sdxl_service.api.errors) is."""
    if _multipart(content_type):
        return error_json(
            f"uploaded files are larger than the limit of {settings.SDXL_MAX_UPLOAD_MB} MB "
            "(SDXL_MAX_UPLOAD_MB)"
        )
    limit_mb = settings.DATA_UPLOAD_MAX_MEMORY_SIZE / (1024 * 1024)
    return error_json(f"request body is larger than the limit of {limit_mb:g} MB")


def _multipart(content_type: str) -> bool:
    return content_type.strip().lower().startswith("multipart/")


def error_json(message: str) -> bytes:
    """The API's error body, encoded, for an answer given before Django sees the request."""
    from sdxl_service.api.errors import error_body  # needs Django set up

    return json.dumps(error_body(message)).encode()


def streaming_in_parts(
    get_response: Callable[[HttpRequest], HttpResponseBase],
) -> Callable[[HttpRequest], HttpResponseBase]:
    """Middleware: under ASGI, a streaming answer's parts (a FileResponse's file: images,
    LoRA files, the admin's static files) are read one at a time on the request's thread
    as they are sent. Django would otherwise read a synchronous iterator whole into memory
    before sending its first byte (with a warning each time)."""
    from asgiref.sync import sync_to_async
    from django.core.handlers.asgi import ASGIRequest

    async def in_parts(parts: Iterator[bytes]) -> AsyncIterator[bytes]:
        def next_part() -> bytes | None:
            return next(parts, None)

        # Thread-sensitive: on the request's own thread, where the file was opened.
        while (part := await sync_to_async(next_part)()) is not None:
            yield part

    def middleware(request: HttpRequest) -> HttpResponseBase:
        response = get_response(request)
        if isinstance(request, ASGIRequest) and isinstance(response, StreamingHttpResponse):
            if not response.is_async:
                parts = cast(Iterator[bytes], response.streaming_content)
                response.streaming_content = in_parts(parts)
        return response

    return middleware
