"""A busy database answers 503 with Retry-After, no space left 507, each naming why: in
DRF's exception handler and, for views outside DRF or a middleware's failure, in handler500."""

import errno
import os
import sqlite3
from pathlib import Path

import psycopg.errors
import pytest
from django.db import connection
from django.db import utils as db_utils
from rest_framework.test import APIClient

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


def sqlite_io_error() -> db_utils.DatabaseError:
    """SQLite's error where it cannot extend the WAL's index (SQLITE_IOERR_SHMSIZE)."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 4874
    return wrapped(error)


@pytest.mark.parametrize("folder_free_bytes, status", [(0, 507), (10 * 1024 * 1024, 500)])
def test_sqlite_io_error_is_507_only_on_a_nearly_full_database_folder(
    monkeypatch, folder_free_bytes, status
):
    """On a full disk SQLite says "disk I/O error" where the WAL's index cannot grow; with
    space left the same error is a failing disk, which stays a 500."""
    if connection.vendor != "sqlite":
        pytest.skip("the database's folder is SQLite's")
    real_statvfs = os.statvfs
    folder = Path(connection.settings_dict["NAME"]).resolve().parent

    def statvfs(path):
        stats = real_statvfs(path)
        if Path(path) != folder:
            return stats
        return os.statvfs_result((*stats[:4], folder_free_bytes // stats.f_frsize, *stats[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    failing(monkeypatch, sqlite_io_error())
    response = APIClient().get("/create_session")
    assert response.status_code == status
    if status == 507:
        assert response.json()["message"] == (
            "no space left on the device of the database: free some space and retry"
        )


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


@pytest.mark.parametrize(
    "error, status",
    [
        (wrapped(psycopg.errors.TooManyConnections("sorry, too many clients already")), 503),
        (wrapped(sqlite3.OperationalError("database is locked")), 503),
        (wrapped(sqlite3.OperationalError("database or disk is full")), 507),
        (ValueError("a bug"), 500),
    ],
)
def test_a_middleware_failing_after_the_view_answers_as_the_api_does(
    monkeypatch, settings, client, django_user_model, error, status
):
    """An admin login: SessionMiddleware saves the new session after the view, outside it
    and outside DRF, on a database with no connection free (or full)."""
    from django.contrib.sessions.backends.db import SessionStore

    settings.SDXL_WEB_DB_LOCK_TIMEOUT = 5
    django_user_model.objects.create_superuser("admin", password="a-password")
    save_in_view = SessionStore.save

    def save(self, must_create=False):
        if must_create:  # the login view's own save (a new session key)
            return save_in_view(self, must_create=True)
        raise error  # SessionMiddleware.process_response's

    monkeypatch.setattr(SessionStore, "save", save)
    client.raise_request_exception = False
    response = client.post("/admin/login/", {"username": "admin", "password": "a-password"})
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    if status == 503:
        assert response.json()["message"].startswith(BUSY)
        assert response["Retry-After"] == "5"
    if status == 500:
        assert response.json() == {"status": "error", "message": "internal server error"}


def test_a_view_outside_drf_answers_503_too(monkeypatch, settings, admin_client):
    from sessions_app.models import Session

    def count(self):
        raise wrapped(sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(type(Session.objects.all()), "count", count)
    admin_client.raise_request_exception = False
    response = admin_client.get("/admin/sessions_app/session/")
    assert response.status_code == 503, response.content[:300]
    assert response.json()["message"].startswith(BUSY)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("post", "/txt2img", {"prompt": "x", "cfg_scale": 7}, 400, "cfg_scale: unknown field"),
        ("post", "/train_status", {"session_id": 987654}, 404, "session 987654 not found"),
        ("get", "/list_sessions", None, 200, None),
        ("get", "/txt2img", None, 405, "not allowed"),
    ],
)
def test_a_4xx_answer_is_logged_once_with_its_message(caplog, method, path, body, status, message):
    """Issue 25: the log line of a 4xx names what was wrong, not only the status."""
    caplog.set_level("INFO", logger="django.request")

    if method == "post":
        response = APIClient().post(path, body, format="json")
    else:
        response = APIClient().get(path)

    lines = [r.getMessage() for r in caplog.records if r.name == "django.request"]
    if message is None:
        assert response.status_code == status and lines == []
        return
    assert response.status_code == status
    (line,) = lines
    assert line.startswith(f"{response.reason_phrase}: {path}: ")
    assert message in line and response.json()["message"] in line
