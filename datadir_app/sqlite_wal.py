"""Reads of an SQLite database keep answering when its disk is full (issue 26).

In WAL mode every connection maps the database's wal-index, the `-shm` file beside it
(32 KiB). The last connection to close deletes it (and the `-wal` file); the next one to
open creates it again, which needs 32 KiB of free disk: on a full disk that fails with
SQLITE_IOERR_SHMSIZE ("disk I/O error"), and so does every query, reads included. The web
server closes its connection after each request (CONN_MAX_AGE 0), so between requests no
connection may be open at all.

Each web process therefore holds one connection of its own open on the database, with
the wal-index mapped, for as long as it runs: a full disk then refuses writes only (the
WAL cannot grow: SQLITE_FULL, "database or disk is full", answered 507), and reads keep
answering. Opened on the first request (only processes that serve requests hold one: a
worker's job processes are forked, and an SQLite connection must not cross a fork), and
tried again on the next request while it fails (a disk already full when the server
starts).
"""

import sqlite3
import threading
from typing import Any

from django.db import connections
from django.db.backends.sqlite3.base import DatabaseWrapper as SQLiteDatabase

_held: dict[str, sqlite3.Connection] = {}
_opening = threading.Lock()


def hold_wal_index(**_signal: Any) -> None:
    """request_started's receiver: the connection holding the default database's
    wal-index, opened if this process holds none yet."""
    connection = connections["default"]
    if not isinstance(connection, SQLiteDatabase) or connection.is_in_memory_db():
        return
    name = str(connection.settings_dict["NAME"])
    if name in _held:
        return
    with _opening:
        if name in _held:
            return
        try:
            holder = sqlite3.connect(name, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the request itself answers why (sdxl_service.api.errors)
        try:
            # A connection maps the wal-index at its first read; read to the end, which
            # ends the read transaction (an open one would keep checkpoints from
            # emptying the WAL).
            holder.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.Error:
            holder.close()
            return
        _held[name] = holder
