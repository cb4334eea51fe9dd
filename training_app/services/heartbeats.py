"""A job's own heartbeat: the row of a running job (training run, generation) says from a
thread of the job's process that the process is alive, so a row whose heartbeat went stale
lost its process (kill -9, out of memory, machine gone), whatever its worker's main process
still says."""

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connection

logger = logging.getLogger(__name__)

# A job's heartbeat thread writes this many times per stale period.
BEATS_PER_STALE_PERIOD = 4


def worker_identity() -> str:
    """host:pid of this process, as the rows it claims record it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def heartbeat(beat: Callable[[], object], stale_after_s: float, what: str) -> Iterator[None]:
    """Calls `beat()` (which writes the heartbeat) from a thread, BEATS_PER_STALE_PERIOD
    times per `stale_after_s`, for as long as the block runs.

    Progress callbacks come only between steps, and loading a model (or one step of a large
    one) can take minutes; the thread beats regardless, so a heartbeat goes stale only when
    the process is gone. A failed write is logged and tried again at the next beat.
    """
    stopped = threading.Event()
    interval = stale_after_s / BEATS_PER_STALE_PERIOD

    def beat_until_stopped() -> None:
        try:
            while not stopped.wait(interval):
                try:
                    beat()
                except DatabaseError:
                    logger.exception("could not write the heartbeat of %s", what)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=beat_until_stopped, name=f"{what} heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
