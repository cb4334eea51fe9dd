"""Handing a row's id to a django-q2 queue; the task id is kept on the row."""

import logging
from collections.abc import Callable
from datetime import timedelta

from django.db.models import Model
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.tasks import async_task

logger = logging.getLogger(__name__)


def enqueue(task: str, row: type[Model], row_id: int, queue: str, name: str) -> None:
    """Call only once the row is committed (`transaction.on_commit`): the worker reloads it."""
    task_id = async_task(task, row_id, cluster=queue, task_name=name)
    row.objects.filter(pk=row_id).update(task_id=task_id)


def redeliver_lost(
    row: type[Model],
    queue: str,
    enqueue_row: Callable[[int], None],
    waited_s: float,
    job_timeout_s: float,
) -> list[int]:
    """Enqueues again (with `enqueue_row(id)`, as when they were created) the rows of `row`
    still queued after `waited_s` seconds whose task the broker no longer holds, and
    returns their ids.

    A task is lost when a worker takes it and dies before claiming its row: the Redis
    broker forgets a task once handed out, and the ORM broker hands it out again only
    after its retry time (hours, for training). The database is the truth: a row that
    has waited while the broker is empty and no row of the queue runs (none started within
    the job timeout, after which a job is killed) has no task left. Enqueuing a row twice
    is harmless: a task claims its row with a conditional update and does nothing for a
    row that is no longer queued.
    """
    now = timezone.now()
    running = row.objects.filter(
        status="running", started_at__gt=now - timedelta(seconds=job_timeout_s)
    )
    if running.exists():
        return []
    waiting = list(
        row.objects.filter(status="queued", created_at__lt=now - timedelta(seconds=waited_s))
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not waiting or get_broker(queue).queue_size():
        return []
    for row_id in waiting:
        enqueue_row(row_id)
        logger.warning("%s %s lost its task in the broker; queued again", row.__name__, row_id)
    return waiting
