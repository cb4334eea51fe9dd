"""`manage.py worker training|generation`: one django-q2 cluster serving one queue.

Besides running the cluster, the worker records a heartbeat row every few seconds, which
is how the web process knows whether anyone will pick up a /txt2img request, and ends
training runs whose own heartbeat went stale because their worker died (at start, so a
restart recovers them, and on every beat after). It also queues again the jobs of its
queue whose task a dying worker took with it (queueing.redeliver_lost), and deletes the
heartbeat rows of workers that are gone.

Liveness is the heartbeat. A beat that fails (the database locked, away or full) is tried
again after a short back-off, with fresh connections. If no beat succeeds for longer than
SDXL_WORKER_STALE_AFTER (by then the web process counts the worker as gone anyway), or the
cluster's sentinel dies, the worker kills its cluster and exits with status 1, for its
supervisor (`serve`, systemd) to start it again. Every process of the cluster dies with the
process that forked it (core.processes), so a worker killed with SIGKILL leaves none behind
to take jobs. SIGTERM/SIGINT stop it cleanly: the cluster finishes its current job first.
"""

import logging
import os
import signal
import socket
import sys
import threading
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.utils import timezone

from core.processes import forked_children_die_with_parent

HEARTBEAT_INTERVAL_S = 2.0
# Back-off after a failed beat: doubles from the first, up to the last.
RETRY_BACKOFF_S = (0.5, 5.0)
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

        from training_app.services.workers import worker_heartbeat_remove

        # The cluster forks its processes from here: no database connection may be shared
        # with them, and nothing here touches torch or CUDA.
        connections.close_all()
        forked_children_die_with_parent()
        cluster = Cluster()
        # Replaces the cluster's own handlers, which stop it from inside the signal handler.
        stop_requested = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: stop_requested.set())
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
        fault = None
        try:
            last_beat, failures = time.monotonic(), 0
            while not stop_requested.is_set():
                if not cluster.sentinel.is_alive():
                    fault = f"its cluster's sentinel died (exit code {cluster.sentinel.exitcode})"
                    break
                try:
                    self._beat(queue, queue_name, host, pid, started)
                    last_beat, failures, pause = time.monotonic(), 0, HEARTBEAT_INTERVAL_S
                except Exception as error:  # the database locked, away or full, most likely
                    failing_s = time.monotonic() - last_beat
                    if failing_s > settings.SDXL_WORKER_STALE_AFTER:
                        fault = f"no heartbeat written for {failing_s:.0f}s ({error})"
                        break
                    logger.warning("heartbeat failed (%s); trying again", error)
                    connections.close_all()  # a broken connection is not used again
                    pause = min(RETRY_BACKOFF_S[0] * 2**failures, RETRY_BACKOFF_S[1])
                    failures += 1
                stop_requested.wait(pause)
        finally:
            if fault is None:
                cluster.stop()  # lets the current job finish
            else:
                _kill_cluster(cluster)
            try:
                worker_heartbeat_remove(queue_name, host, pid)
            except Exception:  # the database still away: the row is pruned later
                logger.exception("could not remove the heartbeat row")
        if fault is not None:
            raise CommandError(f"{queue} worker {host}:{pid} exits: {fault}", returncode=1)
        self.stdout.write(f"{queue} worker {host}:{pid} stopped")

    def _beat(self, queue: str, queue_name: str, host: str, pid: int, started) -> None:
        """One heartbeat, and the recovery of what dead workers left behind."""
        from training_app.services.generations import generations_end_lost, generations_redeliver
        from training_app.services.runs import training_runs_recover_lost, training_runs_redeliver
        from training_app.services.workers import worker_heartbeat_beat, worker_heartbeats_prune

        worker_heartbeat_beat(queue_name, host, pid, started)
        worker_heartbeats_prune(host)
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


def _kill_cluster(cluster) -> None:
    """SIGKILL to the sentinel; its pusher, monitor and pool processes die with it
    (core.processes). A training run cut short resumes from its last checkpoint."""
    if cluster.sentinel.is_alive():
        os.kill(cluster.sentinel.pid, signal.SIGKILL)
    cluster.sentinel.join()


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
