"""The one place that turns errors into the API's JSON shape.

docs/api.md: every error answers `{"status": "error", "message": "..."}` with a fitting
4xx/5xx code; never an HTML page, never a stack trace.
"""

import errno
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.log import log_response
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from core.errors import ServiceError
from sdxl_service.api.parsers import UploadTooBig
from sdxl_service.api.schema import ErrorSerializer

logger = logging.getLogger(__name__)


def error_body(message: str) -> dict[str, Any]:
    """The error shape, rendered through the serializer the OpenAPI description shows."""
    body: dict[str, Any] = ErrorSerializer({"status": "error", "message": message}).data
    return body


def _validation_message(detail: Any, prefix: str = "") -> str:
    """Flattens DRF's nested validation detail into one line that names the field."""
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            if field == "non_field_errors":
                # A nested serializer's own errors belong to the field that holds it.
                name = prefix.rstrip(".")
            elif isinstance(field, int):  # an item of a list field: loras[1]
                name = f"{prefix.rstrip('.')}[{field}]"
            else:
                name = f"{prefix}{field}"
            parts.append(_validation_message(value, f"{name}." if name else ""))
        return "; ".join(parts)
    if isinstance(detail, list):
        return "; ".join(_validation_message(item, prefix) for item in detail)
    field = prefix.rstrip(".")
    return f"{field}: {detail}" if field else str(detail)


# PostgreSQL's SQLSTATEs for a database that is busy rather than broken: a lock not granted
# within lock_timeout, a statement cancelled by statement_timeout, a deadlock, no
# connection slot left; and for a full disk.
_POSTGRES_BUSY = {"55P03", "57014", "40P01", "53300", "53400"}
_POSTGRES_FULL = {"53100"}
# What SQLite and PostgreSQL say where they give no code (a refused connection has none).
_BUSY_MESSAGES = ("database is locked", "database table is locked", "too many clients")
_FULL_MESSAGES = ("database or disk is full",)
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# SQLite's primary result code for an I/O error ("disk I/O error"; the extended code says
# which call failed, never its errno).
_SQLITE_IOERR = 10
# SQLite answers "database or disk is full" where a write of the database or its WAL
# finds no space, but "disk I/O error" where it cannot extend the WAL's index (the 32 KiB
# `-shm` file, SQLITE_IOERR_SHMSIZE): what every query, reads included, met on a full
# disk once no connection held that file open (issue 26). An I/O error is a full disk only
# when the database's folder is (nearly) full as well: a failing disk or a lost mount must
# stay a 500 that someone looks at, not a 507 asking to free space. 1 MiB is far above
# what SQLite's failed allocations need (32 KiB, one page) yet far below any real free
# space, so the space freed by a failing write racing this check does not matter.
_NEARLY_FULL_BYTES = 1024 * 1024


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (Django wraps the driver's errors)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _database_state(exc: BaseException) -> str | None:
    """ "busy" or "full" for a database error that is one of those, else None."""
    if not isinstance(exc, DatabaseError):
        return None
    for cause in _causes(exc):
        sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if sqlstate in _POSTGRES_BUSY:
            return "busy"
        if sqlstate in _POSTGRES_FULL:
            return "full"
        text = str(cause).lower()
        if any(message in text for message in _BUSY_MESSAGES):
            return "busy"
        if any(message in text for message in _FULL_MESSAGES):
            return "full"
        if _sqlite_io_error(cause) and _sqlite_folder_nearly_full():
            return "full"
    return None


def _sqlite_io_error(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_IOERR


def _sqlite_folder_nearly_full() -> bool:
    """Whether the folder of the SQLite database (its -wal and -shm files live beside it)
    has less than _NEARLY_FULL_BYTES free."""
    database = connections["default"].settings_dict
    if database["ENGINE"] != "django.db.backends.sqlite3":
        return False
    try:
        stats = os.statvfs(Path(database["NAME"]).resolve().parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _no_space_where(exc: BaseException) -> str | None:
    """Where a write found no space left (a file error ENOSPC or a full database), for the
    message; None when `exc` is not such an error. Names no host path."""
    if _database_state(exc) == "full":
        return "the database"
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE_ERRNOS:
            filename = cause.filename
            if filename is None or Path(filename).resolve().is_relative_to(settings.DATA_DIR):
                return "the data dir (SDXL_DATA_DIR)"
            return "the temporary files' folder"
    return None


def unavailable_response(
    exc: BaseException, response_class: type[Response] | type[JsonResponse] = Response
) -> HttpResponse | None:
    """503 for a busy database, 507 for no space left; None for any other error.

    The service's writes are transactions (or a single statement) and its files are
    written atomically, so a write that failed here left nothing half-made behind: the
    client may simply retry.
    """
    if _database_state(exc) == "busy":
        logger.warning("database busy: %s", exc)
        response = response_class(
            error_body(
                "the database is busy (another writer holds its lock, or every connection is "
                "in use): retry after Retry-After seconds"
            ),
            status=503,
        )
        response["Retry-After"] = str(max(1, math.ceil(settings.SDXL_WEB_DB_LOCK_TIMEOUT)))
        return response
    where = _no_space_where(exc)
    if where is not None:
        logger.error("no space left in %s: %s", where, exc)
        return response_class(
            error_body(f"no space left on the device of {where}: free some space and retry"),
            status=507,
        )
    return None


# How much of an error's message a log line carries.
_LOGGED_MESSAGE_CHARS = 500


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's EXCEPTION_HANDLER: every exception a view raises becomes the JSON error shape.

    A 4xx answer is logged here with its message (`Bad Request: /txt2img: steps: ...`), in
    place of Django's line, which names only the status and the path."""
    response = _error_response(exc, context)
    request = context.get("request")
    message = getattr(response, "data", None)
    if request is not None and 400 <= response.status_code < 500 and isinstance(message, dict):
        text = str(message.get("message", ""))
        if len(text) > _LOGGED_MESSAGE_CHARS:
            text = text[:_LOGGED_MESSAGE_CHARS] + "..."
        log_response(
            "%s: %s: %s",
            response.reason_phrase,
            request.path,
            text,
            response=response,
            request=getattr(request, "_request", request),
        )
    return response


def _error_response(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    unavailable = unavailable_response(exc)
    if unavailable is not None:
        return unavailable
    if isinstance(exc, ServiceError):
        response = Response(error_body(exc.message), status=exc.status)
        if exc.retry_after is not None:
            response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, UploadTooBig):
        return Response(error_body(str(exc)), status=413)
    if isinstance(exc, RequestDataTooBig):
        limit_mb = settings.DATA_UPLOAD_MAX_MEMORY_SIZE / (1024 * 1024)
        return Response(
            error_body(f"request body is larger than the limit of {limit_mb:g} MB"), status=413
        )
    if isinstance(exc, drf_exceptions.ValidationError):
        return Response(error_body(_validation_message(exc.detail)), status=400)
    if isinstance(exc, drf_exceptions.ParseError):
        request = context.get("request")
        if request is not None and request.content_type.startswith("multipart/"):
            return Response(error_body(f"request body could not be read: {exc.detail}"), 400)
        return Response(error_body(f"request body is not valid JSON: {exc.detail}"), status=400)
    if isinstance(exc, drf_exceptions.APIException):
        response = Response(error_body(str(exc.detail)), status=exc.status_code)
        # Set by DRF on 401s: says which credentials to send (RFC 9110).
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            response["WWW-Authenticate"] = auth_header
        return response
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
    return Response(error_body("internal server error"), status=500)


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body(f"no such endpoint: {request.path}"), status=404)


def json_server_error(request: HttpRequest) -> HttpResponse:
    """handler500, for what no DRF view handled: a view outside DRF (the admin, the front
    door) or a middleware before any view (the session or user loaded from a database
    with no free connection). Django calls it inside its `except`, so the error is at hand:
    a busy database or a full disk answer as in the API, 503 or 507."""
    exc = sys.exception()
    unavailable = None if exc is None else unavailable_response(exc, response_class=JsonResponse)
    return unavailable or JsonResponse(error_body("internal server error"), status=500)


def json_bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("bad request"), status=400)
