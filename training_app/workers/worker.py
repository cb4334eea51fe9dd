"""The worker process (`manage.py worker training|generation`): one django-q2 cluster
serving one queue.

Besides running the cluster, the worker records a heartbeat row every few seconds, which
is how the web process knows whether anyone will pick up a /txt2img request, and ends
training runs whose own heartbeat went stale because their worker died (at start, so a
restart recovers them, and on every beat after), and generations likewise (jobs.end_lost).
It also queues again the jobs of its queue whose task a dying worker took with it
(jobs.redeliver), and deletes the heartbeat rows of workers that are gone.

Liveness is the heartbeat. A beat that fails (the database locked, away or full) is tried
again after a short back-off, with fresh connections. If no beat succeeds for longer than
SDXL_WORKER_STALE_AFTER (by then the web process counts the worker as gone anyway), or the
cluster's sentinel dies, the worker kills its cluster and exits with status 1, for its
supervisor (`serve`, systemd) to start it again. Every process of the cluster dies with the
process that forked it (core.processes), so a worker killed with SIGKILL leaves none behind
to take jobs. A pool process killed while it waits for a job leaves the cluster's task
queue locked for good: the worker then starts a new cluster in its place, as the same
process, beating all along (one killed mid-job django-q2 replaces by itself). SIGTERM and
SIGINT stop it cleanly: the cluster finishes its current job first.
"""

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from django.conf import settings
from django.db import connections
from django.utils import timezone

from core.processes import forked_children_die_with_parent
from training_app import jobs
from training_app.workers.heartbeats import (
    worker_heartbeat_beat,
    worker_heartbeat_remove,
    worker_heartbeats_prune,
)

HEARTBEAT_INTERVAL_S = 2.0
# Back-off after a failed beat: doubles from the first, up to the last.
RETRY_BACKOFF_S = (0.5, 5.0)
WEBHOOK_POLL_INTERVAL_S = 1.0
logger = logging.getLogger(__name__)


QUEUES = ("training", "generation")


def run_worker(queue: str, write: Callable[[str], object]) -> str | None:
    """Serves `queue` ("training" or "generation") until SIGTERM or SIGINT (then returns
    None) or a fault (then returns what went wrong, and the worker should exit with status
    1). `write` gets what an operator should see. The process must have been started with
    Q_CLUSTER_NAME naming the queue (django-q2 reads it when first imported)."""
    from django_q.signals import post_spawn

    queue_name = cluster_name(queue)
    forked_children_die_with_parent()
    post_spawn.connect(_check_task_queue_free, dispatch_uid="sdxl-worker-task-queue-check")
    stop_requested = threading.Event()
    cluster = _cluster_start(queue, queue_name, stop_requested)

    # Webhooks go out from threads of this process (no torch here), never from a web
    # request's: a slow receiver delays its own deliveries only.
    stopped = threading.Event()
    threading.Thread(
        target=_deliver_webhooks, args=(stopped,), name="webhooks", daemon=True
    ).start()

    host, pid, started = socket.gethostname(), os.getpid(), timezone.now()
    write(f"{queue} worker {host}:{pid} serving queue {queue_name}")
    fault = None
    try:
        last_beat, failures = time.monotonic(), 0
        while not stop_requested.is_set():
            if not cluster.sentinel.is_alive():
                fault = f"its cluster's sentinel died (exit code {cluster.sentinel.exitcode})"
                break
            if _task_queue_locked.value:
                message = (
                    "a pool process of the cluster died while waiting for a job (killed, "
                    "out of memory) and holds its task queue's lock; starting a new cluster"
                )
                logger.error(message)
                write(f"{queue} worker: {message}")
                _kill_cluster(cluster)
                cluster = _cluster_start(queue, queue_name, stop_requested)
            try:
                _beat(queue, queue_name, host, pid, started, write)
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
        stopped.set()
        try:
            worker_heartbeat_remove(queue_name, host, pid)
        except Exception:  # the database still away: the row is pruned later
            logger.exception("could not remove the heartbeat row")
    if fault is not None:
        return f"{queue} worker {host}:{pid} exits: {fault}"
    write(f"{queue} worker {host}:{pid} stopped")
    return None


def cluster_name(queue: str) -> str:
    """The django-q2 queue (cluster name) of "training" or "generation"."""
    return {"training": settings.TRAINING_QUEUE, "generation": settings.GENERATION_QUEUE}[queue]


def _beat(
    queue: str, queue_name: str, host: str, pid: int, started, write: Callable[[str], object]
) -> None:
    """One heartbeat, and the recovery of what dead workers left behind."""
    from training_app.services.generations.lifecycle import GENERATIONS
    from training_app.services.runs import TRAINING_RUNS

    worker_heartbeat_beat(queue_name, host, pid, started)
    worker_heartbeats_prune(host)
    for run_id in jobs.end_lost(TRAINING_RUNS):
        write(
            f"training run {run_id} lost its worker; queued again to resume "
            "(or ended, past SDXL_TRAINING_MAX_RESUMES)"
        )
    if queue == "training":
        for run_id in jobs.redeliver(TRAINING_RUNS):
            write(f"training run {run_id} lost its task; queued again")
    else:
        for generation_id in jobs.end_lost(GENERATIONS):
            write(f"generation {generation_id} lost its process; ended")
        for generation_id in jobs.redeliver(GENERATIONS):
            write(f"generation {generation_id} lost its task; queued again")


# Set by a new pool process of the running cluster that finds the cluster's task queue
# locked for good (_check_task_queue_free): shared memory its forked processes inherit.
_task_queue_locked = None
# How long a new pool process waits for the task queue's lock before it counts as held by
# a dead process: no live process holds it for longer than a put or a get takes.
TASK_QUEUE_LOCK_WAIT_S = 1.0


def _cluster_start(queue: str, queue_name: str, stop_requested: threading.Event):
    """Starts a django-q2 cluster for the queue and has it load the model (warm-up)."""
    global _task_queue_locked
    from django_q.cluster import Cluster
    from django_q.tasks import async_task

    _task_queue_locked = multiprocessing.get_context("fork").Value("b", 0)
    # The cluster forks its processes from here: no database connection may be shared
    # with them, and nothing here touches torch or CUDA.
    connections.close_all()
    cluster = Cluster()
    # Replaces the cluster's own handlers, which stop it from inside the signal handler.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop_requested.set())
    cluster.start()
    async_task("training_app.tasks.warm_up_task", queue, cluster=queue_name, task_name="warm-up")
    return cluster


def _check_task_queue_free(sender, **kwargs) -> None:
    """django-q2's post_spawn, in each pool process it starts, before its first job.

    A pool process waits for a job inside multiprocessing's Queue.get, holding the task
    queue's read lock. Killed there (kill -9, or the OOM killer, whose pick is the idle
    generation process that holds the model), it never releases the lock: the process
    started in its place, and every later one, would wait on it forever while the worker
    still beats. The cluster has one pool process (Q_CLUSTER workers = 1), so when this
    one starts no live process holds the lock: held, it is a dead one's, and the worker
    starts a new cluster. Reads django-q2's arguments to the pool process (the task queue
    first) and the queue's lock: implementation details, checked by
    tests/system/training_app/test_generation_faults.py."""
    from django_q.conf import Conf

    if Conf.WORKERS != 1:
        return  # other pool processes hold the lock as they wait: it tells nothing
    task_queue = multiprocessing.current_process()._args[0]
    if task_queue._rlock.acquire(timeout=TASK_QUEUE_LOCK_WAIT_S):
        task_queue._rlock.release()
        return
    logger.error("the task queue's lock is held by a pool process that died waiting for a job")
    _task_queue_locked.value = 1


def _kill_cluster(cluster) -> None:
    """SIGKILL to the sentinel; its pusher, monitor and pool processes die with it
    (core.processes). A training run cut short resumes from its last checkpoint."""
    if cluster.sentinel.is_alive():
        os.kill(cluster.sentinel.pid, signal.SIGKILL)
    cluster.sentinel.join()


def _deliver_webhooks(stopped: threading.Event) -> None:
    """Sends due webhook deliveries (services.webhooks) on SDXL_WEBHOOK_CONCURRENCY
    threads until the worker's cluster stopped (the job it finishes on SIGTERM included):
    claims as many as threads are free, again whenever one frees up or every poll interval.
    An attempt in flight at the stop ends within SDXL_WEBHOOK_TIMEOUT."""
    from training_app.services.webhooks import webhooks_claim_due

    pool = ThreadPoolExecutor(settings.SDXL_WEBHOOK_CONCURRENCY, "webhook")
    in_flight: set[Future] = set()
    while not stopped.is_set():
        try:
            free = settings.SDXL_WEBHOOK_CONCURRENCY - len(in_flight)
            if free:
                for delivery_id in webhooks_claim_due(free):
                    in_flight.add(pool.submit(_deliver_webhook, delivery_id))
        except Exception:  # the database away for a moment: try again on the next round
            logger.exception("webhook delivery round failed")
            connections.close_all()
        if in_flight:
            done, _ = wait(in_flight, WEBHOOK_POLL_INTERVAL_S, FIRST_COMPLETED)
            in_flight -= done
        else:
            stopped.wait(WEBHOOK_POLL_INTERVAL_S)
    pool.shutdown(wait=False)


def _deliver_webhook(delivery_id: int) -> None:
    """One attempt, on a thread of the delivery pool. A failure leaves the delivery
    claimed: it is due again when the claim's lease ends."""
    from training_app.services.webhooks import webhook_deliver

    try:
        webhook_deliver(delivery_id)
    except Exception:  # the database away for a moment
        logger.exception("webhook delivery %s failed", delivery_id)
        connections.close_all()  # this thread's, not used again broken
