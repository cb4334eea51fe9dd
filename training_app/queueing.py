"""Handing a row's id to a django-q2 queue; the task id is kept on the row."""

from django.db.models import Model
from django_q.tasks import async_task


def enqueue(task: str, row: type[Model], row_id: int, queue: str, name: str) -> None:
    """Call only once the row is committed (`transaction.on_commit`): the worker reloads it."""
    task_id = async_task(task, row_id, cluster=queue, task_name=name)
    row.objects.filter(pk=row_id).update(task_id=task_id)
