"""The WSGI application, for Django's runserver or a WSGI server run by hand
(`gunicorn sdxl_service.wsgi:application`). `manage.py serve` runs the ASGI one instead
(sdxl_service.asgi): only there do slow clients cost no thread, and a synchronous
/txt2img learn that its client disconnected.

The same limits as there (sdxl_service.web_requests): the web lock timeout, and a chunked
request body (`Transfer-Encoding: chunked`, no Content-Length) read and held to
body_limit(). gunicorn decodes the chunks and marks the input as terminated
(`wsgi.input_terminated`), but Django reads a body by its CONTENT_LENGTH and, without one,
sees an empty body.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING

from django.conf import settings
from django.core.wsgi import get_wsgi_application

from sdxl_service.web_requests import body_limit, too_big_body, use_web_lock_timeout

if TYPE_CHECKING:
    # typeshed's WSGI protocols exist for the type checker only.
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sdxl_service.settings")


class ChunkedBodies:
    """WSGI middleware: a body gunicorn de-chunked is read here (into memory, or a
    temporary file past FILE_UPLOAD_MAX_MEMORY_SIZE) and handed to Django with its
    CONTENT_LENGTH; past body_limit() the request answers 413."""

    READ_SIZE = 1024 * 1024

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not (chunked and environ.get("wsgi.input_terminated")):
            return self.app(environ, start_response)
        content_type = environ.get("CONTENT_TYPE", "")
        limit = body_limit(content_type)
        body = tempfile.SpooledTemporaryFile(max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE)
        size = 0
        while chunk := environ["wsgi.input"].read(self.READ_SIZE):
            size += len(chunk)
            if size > limit:
                body.close()
                return self._too_big(start_response, content_type)
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
    def _too_big(start_response: StartResponse, content_type: str) -> list[bytes]:
        payload = too_big_body(content_type)
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
