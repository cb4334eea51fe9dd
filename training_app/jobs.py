"""The lifecycle of a job, written once for every kind (a training run, a generation).

A job is a row (models.Job) a worker runs. The web process records it queued and, once
the row is committed, hands its id to the kind's django-q2 queue (`enqueue_new_on_commit`);
a broker that cannot take it (Redis down) withdraws the new row and answers 503: nothing
is left behind to run later, so a client told to retry gets one job, not two.
A task claims the row with a conditional update (`claim`): queued -> running, by this
process; a task delivered twice, or for a row cancelled meanwhile, finds nothing to claim
and does nothing. While it runs, a thread of the job's process keeps the row's heartbeat
fresh (`heartbeat`), and every write the job makes goes through `held_here`: running,
claimed by this process, so a row cancelled or judged lost meanwhile is no longer the
job's to update or end. It ends completed, in error or cancelled (`finish`).

A row whose heartbeat went stale lost its process (kill -9, out of memory, machine gone),
whatever its worker's main process still says: `end_lost` hands it to its kind's hook
(a training run is queued again to resume, a generation ended as an error). A queued row
whose task a dying worker took out of the broker is enqueued again (`redeliver`).

What differs between kinds is a `JobKind`, declared by the kind's service.
"""

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar, cast

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task
from redis.exceptions import RedisError

from core.errors import ServiceError
from training_app.models import Job

logger = logging.getLogger(__name__)

JobT = TypeVar("JobT", bound=Job)

# A job's heartbeat thread writes this many times per stale period.
BEATS_PER_STALE_PERIOD = 4
# The Retry-After of a 503 for a broker that cannot be reached: a Redis restarted by its
# supervisor (systemd, a container's restart policy) answers again within seconds.
BROKER_RETRY_AFTER_S = 10
BROKER_UNREACHABLE_MESSAGE = (
    "the job queue (the broker, REDIS_URL) cannot be reached, so nothing was recorded: "
    "retry after Retry-After seconds"
)


@dataclass(frozen=True)
class JobKind(Generic[JobT]):
    """What one kind of job does its own way; the rest of its lifecycle is this module's.

    Settings are named, not read, here: they are read at each use (tests change them)."""

    model: type[JobT]
    label: str  # in logs and the heartbeat thread's name: "training run", "generation"
    task: str  # the django-q2 task that runs one, given the row's id
    task_name: str  # the task's name, the row's id after it: "generation" -> "generation-12"
    queue_setting: str  # the setting naming its django-q2 queue
    # The setting of how long a heartbeat may be old before the job's process counts as
    # gone; a queued row waits as long before its task counts as lost (`redeliver`).
    stale_after_setting: str
    timeout_setting: str  # the setting of how long a job may run before django-q2 kills it
    # Handles a row whose process is gone, given the row and a query holding it only while
    # it is still lost (a conditional update through it does nothing once the row beat
    # meanwhile). Returns what it did, for the log, or None when the row was not lost after all.
    on_lost: Callable[[JobT, QuerySet[JobT]], str | None]

    @property
    def queue(self) -> str:
        return cast(str, getattr(settings, self.queue_setting))

    @property
    def stale_after_s(self) -> float:
        return cast(float, getattr(settings, self.stale_after_setting))


# --- Queueing ----------------------------------------------------------------------------


def enqueue(kind: JobKind[JobT], row_id: int) -> None:
    """Hands a committed row's id to its kind's queue (the worker reloads the row); the
    task id is kept on the row."""
    task_id = async_task(
        kind.task, row_id, cluster=kind.queue, task_name=f"{kind.task_name}-{row_id}"
    )
    kind.model._default_manager.filter(pk=row_id).update(task_id=task_id)


def enqueue_new_on_commit(kind: JobKind[JobT], row_id: int) -> None:
    """`enqueue` a row the current transaction creates, once it commits (a worker must find
    the row). When the broker cannot take the task, the row is withdrawn and the commit
    raises: a ServiceError 503 with Retry-After for a broker out of reach, the error itself
    otherwise; the request that made the row fails and leaves no job behind.

    Why withdraw rather than keep the row (`redeliver` would run it once the broker is
    back): the client is told the request failed, and one that retries, with or without an
    Idempotency-Key, must not get two jobs; one waiting for its images (/txt2img) must not
    leave a job to run for nobody. Enqueuing inside the transaction instead would let a
    worker take the task before the row is visible (PostgreSQL), find nothing to claim, and
    leave the row for `redeliver`, a stale period later.
    """
    transaction.on_commit(lambda: _enqueue_or_withdraw(kind, row_id))


def _enqueue_or_withdraw(kind: JobKind[JobT], row_id: int) -> None:
    try:
        enqueue(kind, row_id)
    except Exception as error:
        # Deleted only while still queued and unclaimed: a broker that took the task but
        # failed to say so may have handed it to a worker already, and that job stays
        # (its row cascades; a task for a deleted row claims nothing).
        withdrawn, _ = kind.model._default_manager.filter(
            pk=row_id, status=Job.Status.QUEUED
        ).delete()
        if not withdrawn:
            logger.warning("%s %s: the broker failed but a worker took it", kind.label, row_id)
            return
        if _broker_unreachable(error):
            logger.error(
                "%s %s withdrawn: the broker cannot be reached: %s", kind.label, row_id, error
            )
            raise ServiceError(
                BROKER_UNREACHABLE_MESSAGE, status=503, retry_after=BROKER_RETRY_AFTER_S
            ) from error
        raise


def _broker_unreachable(error: Exception) -> bool:
    """Whether `error`, raised by the broker, means it is out of reach (down, refusing
    connections, not answering, out of memory...) rather than a fault of the task."""
    return isinstance(error, RedisError | OSError)


def enqueue_on_commit(kind: JobKind[JobT], row_id: int) -> None:
    """`enqueue` an existing row queued again (a lost run to resume) once the current
    transaction commits. A broker that cannot take it leaves the row queued, logged: the
    row is the job, and `redeliver` enqueues it once the broker is back."""

    def enqueue_or_leave_to_redeliver() -> None:
        try:
            enqueue(kind, row_id)
        except Exception:
            logger.exception(
                "%s %s queued again, but the broker could not take it; it is enqueued again "
                "once the broker answers",
                kind.label,
                row_id,
            )

    transaction.on_commit(enqueue_or_leave_to_redeliver)


def redeliver(kind: JobKind[JobT]) -> list[int]:
    """Enqueues again the rows still queued after the kind's stale period whose task the
    broker no longer holds, and returns their ids. Workers call it every few seconds, so a
    row never stays queued for nothing (a training run holding its session's one slot, a
    caller waiting for its images).

    A task is lost when a worker takes it and dies before claiming its row: the Redis
    broker forgets a task once handed out, and the ORM broker hands it out again only
    after its retry time (hours, for training). The database is the truth: a row that
    has waited while the broker is empty and no row of the queue runs (none started within
    the job timeout, after which a job is killed) has no task left. Enqueuing a row twice
    is harmless: a task claims its row with a conditional update and does nothing for a
    row that is no longer queued.
    """
    now = timezone.now()
    job_timeout = timedelta(seconds=getattr(settings, kind.timeout_setting))
    if kind.model._default_manager.filter(
        status=Job.Status.RUNNING, started_at__gt=now - job_timeout
    ).exists():
        return []
    waiting = list(
        kind.model._default_manager.filter(
            status=Job.Status.QUEUED, created_at__lt=now - timedelta(seconds=kind.stale_after_s)
        )
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not waiting or get_broker(kind.queue).queue_size():
        return []
    for row_id in waiting:
        enqueue(kind, row_id)
        logger.warning("%s %s lost its task in the broker; queued again", kind.label, row_id)
    return waiting


# --- Running -----------------------------------------------------------------------------


def worker_identity() -> str:
    """host:pid of this process, as the rows it claims record it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(kind: JobKind[JobT], row_id: int, **fields: Any) -> bool:
    """Takes a queued row for this process (setting `fields` too); False when it is not
    queued (any more)."""
    now = timezone.now()
    return bool(
        kind.model._default_manager.filter(pk=row_id, status=Job.Status.QUEUED).update(
            status=Job.Status.RUNNING,
            started_at=now,
            heartbeat_at=now,
            worker=worker_identity(),
            **fields,
        )
    )


def held_here(kind: JobKind[JobT], *row_ids: int) -> QuerySet[JobT]:
    """The rows while this process holds them: running, claimed by it. One cancelled, or
    judged lost (queued again, or taken by another worker), meanwhile is no longer the
    job's to update, end or clean up after."""
    return kind.model._default_manager.filter(
        pk__in=row_ids, status=Job.Status.RUNNING, worker=worker_identity()
    )


@contextmanager
def heartbeat(kind: JobKind[JobT], row_ids: list[int]) -> Iterator[None]:
    """Writes the rows' heartbeat from a thread, BEATS_PER_STALE_PERIOD times per the
    kind's stale period, for as long as the block runs.

    Progress callbacks come only between steps, and loading a model (or one step of a large
    one) can take minutes; the thread beats regardless, so a heartbeat goes stale only when
    the process is gone. A failed write is logged and tried again at the next beat.
    """
    stopped = threading.Event()
    interval = kind.stale_after_s / BEATS_PER_STALE_PERIOD
    what = f"{kind.label} {row_ids[0] if len(row_ids) == 1 else row_ids}"

    def beat_until_stopped() -> None:
        try:
            while not stopped.wait(interval):
                try:
                    held_here(kind, *row_ids).update(heartbeat_at=timezone.now())
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


def finish(rows: QuerySet[JobT], status: str, **fields: Any) -> int:
    """Ends the rows of `rows` (completed, error, cancelled...), setting `fields` too;
    returns how many. Conditional, like every status change: `rows` says which rows may
    still be ended (held_here, active, still lost)."""
    return rows.update(status=status, finished_at=timezone.now(), **fields)


# --- Lost --------------------------------------------------------------------------------


def _stale_cutoff(kind: JobKind[JobT]) -> datetime:
    return timezone.now() - timedelta(seconds=kind.stale_after_s)


def lost(kind: JobKind[JobT]) -> QuerySet[JobT]:
    """The running rows whose heartbeat is older than the kind's stale period (rows claimed
    before heartbeats existed count from their start)."""
    cutoff = _stale_cutoff(kind)
    return kind.model._default_manager.filter(status=Job.Status.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    )


def is_lost(kind: JobKind[JobT], row: JobT) -> bool:
    """Whether the process running `row`, as read, is gone (`lost`'s rule, on one row)."""
    last_beat = row.heartbeat_at or row.started_at
    return (
        row.status == Job.Status.RUNNING
        and last_beat is not None
        and last_beat < _stale_cutoff(kind)
    )


def end_lost(kind: JobKind[JobT], **filters: Any) -> list[int]:
    """Hands each lost row (of those matching `filters`) to its kind's `on_lost`; returns
    the ids of those it handled. Workers call it at start and every few seconds."""
    stale = lost(kind).filter(**filters)
    handled = []
    for row in stale:
        outcome = kind.on_lost(row, stale.filter(pk=row.pk))
        if outcome is not None:
            handled.append(row.pk)
            logger.warning("%s %s lost its process; %s", kind.label, row.pk, outcome)
    return handled
