"""A busy database answers 503 with Retry-After, no space left 507, each naming why: in
DRF's exception handler and, for views outside DRF, in the middleware."""

import errno
import sqlite3

import psycopg.errors
import pytest
from django.db import utils as db_utils
from django.http import HttpResponse
from django.test import RequestFactory
from rest_framework.test import APIClient

from sdxl_service.api.errors import UnavailableErrorsMiddleware
from sessions_app import services as session_services

pytestmark = pytest.mark.django_db

BUSY = "the database is busy (another writer holds its lock, or every connection is in use)"


def wrapped(driver_error: Exception) -> db_utils.DatabaseError:
    """The driver's error as Django raises it (django.db.utils wraps it, `from` it)."""
    try:
        raise db_utils.OperationalError(*driver_error.args) from driver_error
    except db_utils.DatabaseError as error:
        return error


def failing(monkeypatch, error: Exception) -> None:
    """/create_session raises `error` from its service."""

    def session_create(caller=None):
        raise error

    monkeypatch.setattr(session_services, "session_create", session_create)


@pytest.mark.parametrize(
    "driver_error",
    [
        sqlite3.OperationalError("database is locked"),
        sqlite3.OperationalError("database table is locked"),
        psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.TooManyConnections("sorry, too many clients already"),
        psycopg.OperationalError("connection failed: FATAL: sorry, too many clients already"),
    ],
)
def test_busy_database_answers_503_with_retry_after(monkeypatch, settings, driver_error):
    settings.SDXL_WEB_DB_LOCK_TIMEOUT = 2.5
    failing(monkeypatch, wrapped(driver_error))
    response = APIClient().get("/create_session")
    assert response.status_code == 503
    assert response.json() == {
        "status": "error",
        "message": f"{BUSY}: retry after Retry-After seconds",
    }
    assert response["Retry-After"] == "3"


@pytest.mark.parametrize(
    "error, where",
    [
        (wrapped(sqlite3.OperationalError("database or disk is full")), "the database"),
        (wrapped(psycopg.errors.DiskFull("could not extend file")), "the database"),
        (None, "the data dir (SDXL_DATA_DIR)"),
        (OSError(errno.ENOSPC, "No space left on device", "/tmp"), "the temporary files' folder"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the data dir (SDXL_DATA_DIR)"),
    ],
)
def test_no_space_left_answers_507_naming_where(monkeypatch, data_dir, error, where):
    if error is None:
        error = OSError(errno.ENOSPC, "No space left on device", str(data_dir / "x" / "0.png"))
    failing(monkeypatch, error)
    response = APIClient().get("/create_session")
    assert response.status_code == 507
    assert response.json() == {
        "status": "error",
        "message": f"no space left on the device of {where}: free some space and retry",
    }


@pytest.mark.parametrize(
    "error",
    [
        wrapped(sqlite3.OperationalError("no such table: sessions_app_session")),
        wrapped(psycopg.errors.UndefinedTable("relation does not exist")),
        OSError(errno.EACCES, "Permission denied"),
        RuntimeError("database is locked"),  # not a database error: a bug, a 500
    ],
)
def test_other_failures_stay_a_generic_500(monkeypatch, error):
    failing(monkeypatch, error)
    response = APIClient().get("/create_session")
    assert response.status_code == 500
    assert response.json() == {"status": "error", "message": "internal server error"}


def test_views_outside_drf_answer_503_and_507_too(settings):
    settings.SDXL_WEB_DB_LOCK_TIMEOUT = 5
    middleware = UnavailableErrorsMiddleware(lambda request: HttpResponse())
    request = RequestFactory().get("/admin/")
    busy = middleware.process_exception(
        request, wrapped(sqlite3.OperationalError("database is locked"))
    )
    assert (busy.status_code, busy["Retry-After"]) == (503, "5")
    full = middleware.process_exception(request, OSError(errno.ENOSPC, "No space left"))
    assert full.status_code == 507
    assert middleware.process_exception(request, ValueError("a bug")) is None
