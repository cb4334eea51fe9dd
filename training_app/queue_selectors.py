"""Reads of the job queues: where a queued training run or generation stands, what it waits
for and roughly when a worker takes it; and how many jobs of each queue wait (/healthz,
`doctor`).

Workers take jobs in the order they were queued (each queue's tasks are handed out first
in, first out, and the rows' ids follow that order), one at a time per worker process: a
training worker trains one run, a generation worker renders one batch (the oldest queued
request and the queued ones that can share its batch: services.generations.batches).
Owners' quotas limit how many jobs an owner may queue, not their order. So a job's place
is the number of queued jobs of its queue with a smaller id, plus one. (A run queued again
after its worker was lost keeps its place here, though its new task is behind those queued
meanwhile: the rare case where the place is off.)

The estimate of when a worker takes it (`queue_eta_seconds`) adds up what runs ahead of
it: the running jobs' time left and, for each queued job ahead, its length at a recent
pace (the running run's time per step, else the last finished run's, plus that run's model
loading; for generations, the recent time per image). Training runs go to whichever live
worker is free first; generations' time is divided among the live workers. It is null when
unknown: no live worker, no pace measured yet, a job ahead of unknown length.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from training_app.models import Generation, Job, TrainingRun
from training_app.selectors import live_worker_count, run_eta_seconds, seconds_per_step

# A recent pace is read from this many of the newest finished jobs.
RECENT_JOBS = 5


@dataclass(frozen=True)
class QueuePlace:
    """Where one queued job stands."""

    position: int  # 1: the next one a worker takes
    waiting_for: dict[str, Any] | None  # {"run_id": 3}, {"generation_id": 7}, {"worker": ...}
    eta_seconds: int | None  # until a worker takes it; None when unknown

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue_position": self.position,
            "waiting_for": self.waiting_for,
            "queue_eta_seconds": self.eta_seconds,
        }


NOT_QUEUED: dict[str, Any] = {
    "queue_position": None,
    "waiting_for": None,
    "queue_eta_seconds": None,
}


def jobs_waiting() -> dict[str, int]:
    """How many training runs and generations are queued: the database's count, the truth.
    (A broker's queue size misses the tasks a worker has already taken out of it while its
    one job runs, and those of a queue whose worker never started.)"""
    return {
        "training": TrainingRun.objects.filter(status=Job.Status.QUEUED).count(),
        "generation": Generation.objects.filter(status=Job.Status.QUEUED).count(),
    }


# --- Training runs ---------------------------------------------------------------------


def training_queue_places(runs: Iterable[TrainingRun]) -> dict[int, QueuePlace]:
    """The queue place of each queued run of `runs`, by run id (a run not queued has none)."""
    wanted = {run.pk for run in runs if run.status == Job.Status.QUEUED}
    if not wanted:
        return {}
    queued = list(
        TrainingRun.objects.filter(status=Job.Status.QUEUED, pk__lte=max(wanted)).order_by("pk")
    )
    running = list(TrainingRun.objects.filter(status=Job.Status.RUNNING).order_by("pk"))
    workers = live_worker_count(settings.TRAINING_QUEUE)
    per_step, per_run = _training_pace(running)

    # Time until each running run frees its worker; a run ahead of unknown length makes
    # every estimate behind it unknown.
    busy: list[float | None] = [run_eta_seconds(run) for run in running]
    # The first queued run waits for the running run that should end first (the oldest
    # when none can tell): with several training workers (SDXL_GPUS), its worker is freed.
    soonest = min(
        range(len(running)),
        key=lambda i: (busy[i] is None, busy[i] or 0.0, running[i].pk),
        default=None,
    )
    # When each worker is free: the running runs' time left, 0 for an idle live worker.
    # A run ahead of unknown length makes every estimate behind it unknown.
    free_at: list[float] | None = (
        sorted([*(b for b in busy if b is not None), *[0.0] * (workers - len(running))])
        if workers and None not in busy
        else None
    )
    places = {}
    for index, run in enumerate(queued):
        # The next free worker takes it.
        starts_at = heapq.heappop(free_at) if free_at else None
        if run.pk in wanted:
            if index:
                waiting_for: dict[str, Any] | None = {"run_id": queued[index - 1].pk}
            elif soonest is not None:
                waiting_for = {"run_id": running[soonest].pk}
            elif not workers:
                waiting_for = {"worker": "training"}
            else:
                waiting_for = None  # a worker takes it now
            eta = None if starts_at is None else round(starts_at)
            places[run.pk] = QueuePlace(index + 1, waiting_for, eta)
        steps = _run_steps(run)
        if free_at is None or starts_at is None or steps is None or per_step is None:
            free_at = None
        else:
            heapq.heappush(free_at, starts_at + per_run + steps * per_step)
    return places


def _run_steps(run: TrainingRun) -> int | None:
    """A queued run's steps: known once given (or once it started), else unknown."""
    steps = run.total_steps or run.parameters.get("steps")
    if run.resumed_from_step and steps:
        return max(0, int(steps) - run.resumed_from_step)
    return int(steps) if steps else None


def _training_pace(running: list[TrainingRun]) -> tuple[float | None, float]:
    """Seconds per step (the oldest running run's so far, else the newest finished run's)
    and seconds a run spends before and after its steps (loading, saving), from the newest
    completed run; (None, 0) before any was timed."""
    per_step = next((pace for pace in map(seconds_per_step, running) if pace is not None), None)
    per_run = 0.0
    finished = TrainingRun.objects.filter(
        status=Job.Status.COMPLETED,
        training_started_at__isnull=False,
        started_at__isnull=False,
        finished_at__isnull=False,
        total_steps__gt=0,
    ).order_by("-finished_at")[:RECENT_JOBS]
    for run in finished:
        timed = (run.total_steps or 0) - (run.resumed_from_step or 0)
        if timed < 1 or run.finished_at is None or run.training_started_at is None:
            continue
        training_s = (run.finished_at - run.training_started_at).total_seconds()
        if per_step is None:
            per_step = training_s / timed
        if run.started_at is not None:
            per_run = max(0.0, (run.training_started_at - run.started_at).total_seconds())
        break
    return per_step, per_run


# --- Generations -----------------------------------------------------------------------


def generation_queue_places(generations: Iterable[Generation]) -> dict[int, QueuePlace]:
    """The queue place of each queued generation of `generations`, by id."""
    wanted = {g.pk for g in generations if g.status == Job.Status.QUEUED}
    if not wanted:
        return {}
    queued = list(
        Generation.objects.filter(status=Job.Status.QUEUED, pk__lte=max(wanted))
        .order_by("pk")
        .only("pk", "status", "parameters")
    )
    running = list(Generation.objects.filter(status=Job.Status.RUNNING).order_by("pk"))
    workers = live_worker_count(settings.GENERATION_QUEUE)
    per_image = seconds_per_image()
    ahead: float | None = 0.0
    if running:
        ahead = None if per_image is None else sum(_generation_left(g, per_image) for g in running)
    places = {}
    for index, generation in enumerate(queued):
        if generation.pk in wanted:
            if index:
                waiting_for: dict[str, Any] | None = {"generation_id": queued[index - 1].pk}
            elif running:
                # The batch that runs: its requests' ids, the oldest first.
                waiting_for = {
                    "generation_id": running[0].pk,
                    "batch": [g.pk for g in running],
                }
            elif not workers:
                waiting_for = {"worker": "generation"}
            else:
                waiting_for = None
            eta = None if ahead is None or not workers else round(ahead / workers)
            places[generation.pk] = QueuePlace(index + 1, waiting_for, eta)
        ahead = (
            None if ahead is None or per_image is None else ahead + _images(generation) * per_image
        )
    return places


def _images(generation: Generation) -> int:
    return int(generation.parameters.get("num_images") or 1)


def _generation_left(generation: Generation, per_image: float) -> float:
    """A running generation's time left at the recent pace: from its steps done once it
    reports them, else from the time since it started."""
    whole = _images(generation) * per_image
    if generation.total_steps:
        return whole * (1 - min(generation.step, generation.total_steps) / generation.total_steps)
    if generation.started_at is not None:
        return max(0.0, whole - (timezone.now() - generation.started_at).total_seconds())
    return whole


def seconds_per_image() -> float | None:
    """The recent time per image: the newest completed generations' durations over their
    images; None before any completed."""
    recent: QuerySet[Generation] = Generation.objects.filter(
        status=Job.Status.COMPLETED, duration_ms__isnull=False, image_count__gt=0
    ).order_by("-finished_at", "-pk")[:RECENT_JOBS]
    timed = [(g.duration_ms or 0, g.image_count) for g in recent]
    images = sum(count for _, count in timed)
    if not images:
        return None
    return sum(ms for ms, _ in timed) / 1000 / images
