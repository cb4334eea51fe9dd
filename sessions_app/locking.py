"""The per-session lock.

It is a row lock on the Session in a write transaction: `SELECT ... FOR UPDATE` on
PostgreSQL, and on SQLite an IMMEDIATE transaction (settings), which takes the database's
write lock. Either way it holds across processes and across machines that share the
database and the data dir, which a threading.Lock or a file lock would not.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import transaction

from core.errors import ServiceError
from sessions_app.models import Session


@contextmanager
def session_lock(session_id: int) -> Iterator[Session]:
    with transaction.atomic():
        try:
            session = Session.objects.select_for_update().get(pk=session_id)
        except Session.DoesNotExist:
            raise ServiceError(f"session {session_id} not found", status=404) from None
        yield session
