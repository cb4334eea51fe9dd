"""Worker heartbeats: a row per running worker cluster, written every few seconds, which is
how the web process knows whether anyone will pick up a /txt2img request."""

import os
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from training_app.models import WorkerHeartbeat

# A row not written for this many SDXL_WORKER_STALE_AFTER periods belongs to a worker that
# is gone (a live worker that cannot write its heartbeat for one period exits): it is
# deleted. Generous, so a host whose clock runs behind keeps its rows.
PRUNE_AFTER_STALE_PERIODS = 20


def worker_heartbeat_beat(queue: str, host: str, pid: int, started_at: datetime) -> None:
    WorkerHeartbeat.objects.update_or_create(
        queue=queue,
        host=host,
        pid=pid,
        defaults={"started_at": started_at, "last_seen": timezone.now()},
    )


def worker_heartbeat_remove(queue: str, host: str, pid: int) -> None:
    WorkerHeartbeat.objects.filter(queue=queue, host=host, pid=pid).delete()


def worker_heartbeats_prune(host: str) -> int:
    """Deletes the rows of workers that are gone: any not seen for PRUNE_AFTER_STALE_PERIODS,
    and those of this host whose process no longer exists. Returns how many."""
    cutoff = timezone.now() - timedelta(
        seconds=settings.SDXL_WORKER_STALE_AFTER * PRUNE_AFTER_STALE_PERIODS
    )
    dead_here = [
        row_id
        for row_id, pid in WorkerHeartbeat.objects.filter(host=host).values_list("id", "pid")
        if not _process_exists(pid)
    ]
    old, _ = WorkerHeartbeat.objects.filter(last_seen__lt=cutoff).delete()
    dead, _ = WorkerHeartbeat.objects.filter(id__in=dead_here).delete()
    return old + dead


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
