"""Reads of runs, LoRA files, generations and workers: rows and querysets (training_app.bodies
shapes them for the API and the webhooks)."""

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Max, OuterRef, QuerySet, Subquery
from django.utils import timezone

from access_app.callers import Caller
from access_app.selectors import caller_owner_id
from core.errors import ServiceError
from sessions_app.models import Session, TrainingImage
from sessions_app.selectors import session_get, session_images, sessions_visible
from training_app.models import (
    Generation,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
    TrainingSample,
    WorkerHeartbeat,
)

LORA_NOT_FOUND = "Requested LoRA not found"


def generations_visible(caller: Caller | None) -> QuerySet[Generation]:
    """Whose generations a caller sees: its owner's, or all for admin tokens (and the open
    API); `caller=None` (admin, commands, workers) sees all."""
    if caller is None or caller.is_admin:
        return Generation.objects.all()
    return Generation.objects.filter(owner_id=caller_owner_id(caller))


def generation_get(generation_id: int, caller: Caller | None = None) -> Generation:
    """The one read of a generation by id: another owner's is a 404 like a missing one."""
    generation = (
        generations_visible(caller)
        .prefetch_related("applied_loras")
        .filter(pk=generation_id)
        .first()
    )
    if generation is None:
        raise ServiceError(f"generation {generation_id} not found", status=404)
    return generation


def lora_get(
    session_id: int, iteration: int | None = None, caller: Caller | None = None
) -> LoraArtifact:
    """The session's LoRA number `iteration`, or its latest (the one created last); one of
    another owner's sessions has none."""
    loras = LoraArtifact.objects.filter(session_id=session_id, session__in=sessions_visible(caller))
    if iteration is not None:
        loras = loras.filter(number=iteration)
    artifact = loras.order_by("-number").first()
    if artifact is None:
        raise ServiceError(LORA_NOT_FOUND, status=404)
    return artifact


def lora_file_get(
    session_id: int,
    iteration: int | None = None,
    lora_filename: str | None = None,
    caller: Caller | None = None,
) -> LoraArtifact | TrainingCheckpoint:
    """Any LoRA file of the session by its name (a numbered LoRA or a run's checkpoint),
    else as lora_get finds one."""
    if lora_filename is None:
        return lora_get(session_id, iteration, caller)
    named = {
        "session_id": session_id,
        "session__in": sessions_visible(caller),
        "filename": lora_filename,
    }
    found = (
        LoraArtifact.objects.filter(**named).first()
        or TrainingCheckpoint.objects.filter(**named).first()
    )
    if found is None:
        raise ServiceError(f"{LORA_NOT_FOUND}: {lora_filename}", status=404)
    return found


def latest_lora_filenames(session_ids: list[int]) -> dict[int, str]:
    newest_numbers = (
        LoraArtifact.objects.filter(session_id=OuterRef("session_id"))
        .order_by("-number")
        .values("number")[:1]
    )
    return dict(
        LoraArtifact.objects.filter(
            session_id__in=session_ids, number=Subquery(newest_numbers)
        ).values_list("session_id", "filename")
    )


def seconds_per_step(run: TrainingRun) -> float | None:
    """The run's time per step so far, from the start of its training to its last heartbeat;
    None before a step is timed. A resumed run's clock started at its resume step."""
    steps_timed = (run.step or 0) - (run.resumed_from_step or 0)
    if steps_timed < 1 or run.training_started_at is None or run.heartbeat_at is None:
        return None
    return (run.heartbeat_at - run.training_started_at).total_seconds() / steps_timed


def run_eta_seconds(run: TrainingRun) -> int | None:
    """Seconds left, from the time per step so far; None until the first step is done, and
    None once the run is not being trained: no training worker beats (it died), or the run's
    own heartbeat missed two beats (its job's process died), until it is resumed or ended."""
    if run.stage == TrainingRun.Stage.SAVING:
        return 0
    per_step = seconds_per_step(run)
    if (
        run.stage != TrainingRun.Stage.TRAINING
        or not run.total_steps
        or per_step is None
        or run.heartbeat_at is None
    ):
        return None
    since_last_step = (timezone.now() - run.heartbeat_at).total_seconds()
    if since_last_step > settings.SDXL_RUN_STALE_AFTER / 2 or not worker_alive(
        settings.TRAINING_QUEUE
    ):
        return None
    return max(0, round(per_step * (run.total_steps - run.step) - since_last_step))


def latest_runs(session_ids: list[int]) -> dict[int, TrainingRun]:
    newest_ids = (
        TrainingRun.objects.filter(session_id__in=session_ids)
        .values("session_id")
        .annotate(newest=Max("id"))
        .values("newest")
    )
    runs = (
        TrainingRun.objects.filter(id__in=newest_ids)
        .select_related("artifact")
        .prefetch_related("samples", "checkpoints")
    )
    return {run.session_id: run for run in runs}


def training_sample_get(sample_id: int, caller: Caller | None = None) -> TrainingSample:
    sample = (
        TrainingSample.objects.select_related("run")
        .filter(pk=sample_id, run__session__in=sessions_visible(caller))
        .first()
    )
    if sample is None:
        raise ServiceError(f"sample {sample_id} not found", status=404)
    return sample


def worker_alive(queue: str) -> bool:
    fresh_since = timezone.now() - timedelta(seconds=settings.SDXL_WORKER_STALE_AFTER)
    return WorkerHeartbeat.objects.filter(queue=queue, last_seen__gte=fresh_since).exists()


def live_worker_count(queue: str) -> int:
    """How many workers of `queue` beat within SDXL_WORKER_STALE_AFTER."""
    fresh_since = timezone.now() - timedelta(seconds=settings.SDXL_WORKER_STALE_AFTER)
    return WorkerHeartbeat.objects.filter(queue=queue, last_seen__gte=fresh_since).count()


# GET /sessions/<id> lists this many of the session's newest generations.
RECENT_GENERATIONS = 20


@dataclass(frozen=True)
class SessionDetail:
    """What GET /sessions/<id> shows of a session (training_app.bodies shapes it)."""

    session: Session
    images: QuerySet[TrainingImage]
    loras: QuerySet[LoraArtifact]
    checkpoints: QuerySet[TrainingCheckpoint]
    runs: QuerySet[TrainingRun]
    recent_generations: QuerySet[Generation]


def session_detail(session_id: int, caller: Caller | None = None) -> SessionDetail:
    """The session's images, LoRA files, checkpoints and runs, oldest first, and its
    newest generations (those that applied one of its LoRAs); 404 for a session the caller
    does not see."""
    session = session_get(session_id, caller)
    return SessionDetail(
        session=session,
        images=session_images(session.pk),
        loras=LoraArtifact.objects.filter(session=session).order_by("number"),
        checkpoints=TrainingCheckpoint.objects.filter(session=session).order_by("run_id", "step"),
        runs=TrainingRun.objects.filter(session=session).order_by("id"),
        recent_generations=generations_visible(caller)
        .filter(applied_loras__source_session_id=session.pk)
        .distinct()
        .order_by("-id")[:RECENT_GENERATIONS],
    )
