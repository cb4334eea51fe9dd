"""`manage.py worker training|generation`: one django-q2 cluster serving one queue.

Besides running the cluster, the worker records a heartbeat row every few seconds, which
is how the web process knows whether anyone will pick up a /txt2img request, and ends
training runs whose own heartbeat went stale because their worker died (at start, so a
restart recovers them, and on every beat after). It also queues again the jobs of its
queue whose task a dying worker took with it (queueing.redeliver_lost).
"""

import logging
import os
import socket
import sys
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connections
from django.utils import timezone

HEARTBEAT_INTERVAL_S = 2.0
WEBHOOK_POLL_INTERVAL_S = 1.0
logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Runs the worker cluster of one queue: training or generation."

    def add_arguments(self, parser):
        parser.add_argument("queue", choices=["training", "generation"])

    def handle(self, *args, queue: str, **options):
        queue_name = {
            "training": settings.TRAINING_QUEUE,
            "generation": settings.GENERATION_QUEUE,
        }[queue]
        if os.environ.get("Q_CLUSTER_NAME") != queue_name:
            # django-q2 reads its cluster name from the environment when it is first
            # imported, which Django setup has already done: start again with it set.
            os.environ["Q_CLUSTER_NAME"] = queue_name
            os.execv(sys.executable, [sys.executable, *sys.argv])

        from django_q.cluster import Cluster
        from django_q.tasks import async_task

        from training_app.models import WorkerHeartbeat
        from training_app.services.generations import generations_end_lost, generations_redeliver
        from training_app.services.runs import training_runs_recover_lost, training_runs_redeliver

        # The cluster forks its processes from here: no database connection may be shared
        # with them, and nothing here touches torch or CUDA.
        connections.close_all()
        cluster = Cluster()
        cluster.start()
        async_task(
            "training_app.tasks.warm_up_task", queue, cluster=queue_name, task_name="warm-up"
        )

        # Webhooks go out from a thread of this process (no torch here), never from a web
        # request's: a slow receiver delays its own deliveries only.
        threading.Thread(
            target=_deliver_webhooks, args=(cluster,), name="webhooks", daemon=True
        ).start()

        host, pid, started = socket.gethostname(), os.getpid(), timezone.now()
        self.stdout.write(f"{queue} worker {host}:{pid} serving queue {queue_name}")
        try:
            while cluster.sentinel.is_alive():
                WorkerHeartbeat.objects.update_or_create(
                    queue=queue_name,
                    host=host,
                    pid=pid,
                    defaults={"started_at": started, "last_seen": timezone.now()},
                )
                for run_id in training_runs_recover_lost():
                    self.stdout.write(
                        f"training run {run_id} lost its worker; queued again to resume "
                        "(or ended, past SDXL_TRAINING_MAX_RESUMES)"
                    )
                if queue == "training":
                    for run_id in training_runs_redeliver():
                        self.stdout.write(f"training run {run_id} lost its task; queued again")
                else:
                    for generation_id in generations_end_lost():
                        self.stdout.write(f"generation {generation_id} lost its process; ended")
                    for generation_id in generations_redeliver():
                        self.stdout.write(f"generation {generation_id} lost its task; queued again")
                time.sleep(HEARTBEAT_INTERVAL_S)
        finally:
            WorkerHeartbeat.objects.filter(queue=queue_name, host=host, pid=pid).delete()
        self.stdout.write(f"{queue} worker {host}:{pid} stopped")


def _deliver_webhooks(cluster) -> None:
    """Sends due webhook deliveries (services.webhooks) while the cluster runs."""
    from training_app.services.webhooks import webhooks_deliver_due

    while cluster.sentinel.is_alive():
        try:
            webhooks_deliver_due()
        except Exception:  # the database away for a moment: try again on the next round
            logger.exception("webhook delivery round failed")
            connections.close_all()
        time.sleep(WEBHOOK_POLL_INTERVAL_S)
