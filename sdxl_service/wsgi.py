"""The web server's WSGI application (gunicorn runs `sdxl_service.wsgi:application`).

Two things differ here from the workers, which load the same settings:

- a request waits at most SDXL_WEB_DB_LOCK_TIMEOUT for a database lock (503 after it,
  sdxl_service.api.errors), where workers keep waiting 30 s so their writes are not lost;
- a chunked request body (`Transfer-Encoding: chunked`, no Content-Length) is read.
  gunicorn decodes the chunks and marks the input as terminated (`wsgi.input_terminated`),
  but Django reads a body by its CONTENT_LENGTH and, without one, sees an empty body.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING

from django.conf import settings
from django.core.wsgi import get_wsgi_application

if TYPE_CHECKING:
    # typeshed's WSGI protocols exist for the type checker only.
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sdxl_service.settings")


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


def chunked_body_limit() -> int:
    """The most a chunked body may hold: the larger of the JSON body limit
    (SDXL_MAX_BODY_MB) and the file upload limit (SDXL_MAX_UPLOAD_MB), as for a body with a
    Content-Length; Django and the upload handler then apply the one that fits."""
    limit: int = max(
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE, settings.SDXL_MAX_UPLOAD_MB * 1024 * 1024
    )
    return limit


class ChunkedBodies:
    """WSGI middleware: a body gunicorn de-chunked is read here (into memory, or a
    temporary file past FILE_UPLOAD_MAX_MEMORY_SIZE) and handed to Django with its
    CONTENT_LENGTH; past chunked_body_limit() the request answers 413 unread."""

    READ_SIZE = 1024 * 1024

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not (chunked and environ.get("wsgi.input_terminated")):
            return self.app(environ, start_response)
        limit = chunked_body_limit()
        body = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE)
        size = 0
        while chunk := environ["wsgi.input"].read(self.READ_SIZE):
            size += len(chunk)
            if size > limit:
                body.close()
                return self._too_big(start_response, limit)
            body.write(chunk)
        body.seek(0)
        environ["wsgi.input"] = body
        environ["CONTENT_LENGTH"] = str(size)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            body.close()
            raise
        return _ClosingAfter(result, body)

    @staticmethod
    def _too_big(start_response: StartResponse, limit: int) -> list[bytes]:
        from sdxl_service.api.errors import error_body  # needs Django set up

        message = f"request body is larger than the limit of {limit / (1024 * 1024):g} MB"
        payload = json.dumps(error_body(message)).encode()
        start_response(
            "413 Request Entity Too Large",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]


class _ClosingAfter:
    """The response's iterable, closing the spooled body once the server closes it."""

    def __init__(self, result: Iterable[bytes], body: IO[bytes]) -> None:
        self.result, self.body = result, body

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.result)

    def close(self) -> None:
        try:
            if hasattr(self.result, "close"):
                self.result.close()
        finally:
            self.body.close()


use_web_lock_timeout()
application = ChunkedBodies(get_wsgi_application())
