"""A generation's life after its request was recorded (requests) until it ends.

The web process waits on the row (generation_wait) while the worker runs it (batches).
While it runs, the job's process keeps the row's heartbeat fresh: a running row whose
heartbeat went stale lost its process and is ended as an error (_generation_lost). A
generation nobody wants any more (its client went away or was answered 504, or POST
/generations/<id>/cancel) is cancelled: the worker stops between denoising steps.
"""

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db.models import QuerySet

from access_app.callers import Caller
from core.errors import ServiceError
from training_app import jobs
from training_app.bodies import generation_status_body
from training_app.models import Generation
from training_app.selectors import generation_get, worker_alive
from training_app.services.webhooks import webhook_emit

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.1
# img2img's starting image, kept in the generation's folder as it was sent.
INIT_IMAGE_NAME = "init_image"
# Inpainting's mask, beside it, as a greyscale PNG of the grey levels sent.
MASK_IMAGE_NAME = "mask.png"

WORKER_LOST_MESSAGE = "the generation worker was lost (killed or crashed) during this request"
# Why a generation was cancelled (its message, GET /generations/<id>).
CANCELLED_BY_REQUEST = "cancelled by POST /generations/<id>/cancel"
CANCELLED_CLIENT_GONE = "cancelled: the client disconnected before it finished"
CANCELLED_TIMED_OUT = "cancelled: its client was answered 504 (SDXL_TXT2IMG_TIMEOUT) first"
NO_WORKER_MESSAGE = (
    "no generation worker is running; start the service with `python manage.py serve` "
    "(or a worker alone with `python manage.py worker generation`)"
)


def generations_dir(generation_id: int) -> Path:
    return settings.GENERATIONS_DIR / str(generation_id)


def generation_wait(
    generation_id: int, timeout_s: float, client_gone: Callable[[], bool] | None = None
) -> tuple[Generation, list[bytes]]:
    """Waits for the worker to finish the generation; returns the row and its image bytes.

    503 at once when no worker is alive for a queued one, or when the process running it
    was lost (its heartbeat went stale: the row is ended as an error). `client_gone()`
    true: the caller went away, so the generation is given up (abandoned if still queued,
    cancelled between steps if running). After `timeout_s`: 504, and the same.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        generation = Generation.objects.get(pk=generation_id)
        status = generation.status
        if status == Generation.Status.COMPLETED:
            folder = generations_dir(generation_id)
            images = [
                (folder / generation.image_filename(i)).read_bytes()
                for i in range(generation.image_count)
            ]
            return generation, images
        if status == Generation.Status.ERROR:
            if generation.error_message == WORKER_LOST_MESSAGE:
                raise ServiceError(WORKER_LOST_MESSAGE, status=503)
            raise ServiceError(f"generation failed: {generation.error_message}", status=500)
        if status not in Generation.ACTIVE_STATUSES:  # cancelled (or abandoned) meanwhile
            raise ServiceError(f"generation {generation_id} was {status}", status=409)
        if status == Generation.Status.QUEUED and not worker_alive(settings.GENERATION_QUEUE):
            _abandon(generation_id)
            raise ServiceError(NO_WORKER_MESSAGE, status=503)
        if jobs.is_lost(GENERATIONS, generation):
            jobs.end_lost(GENERATIONS)
            continue  # read again: ended as lost, unless it beat in the meantime
        if client_gone is not None and client_gone():
            _give_up(generation_id, CANCELLED_CLIENT_GONE)
            # Nobody reads this answer; 499 (nginx's "client closed request") in the logs.
            raise ServiceError("the client disconnected; the generation was cancelled", status=499)
        if time.monotonic() > deadline:
            _give_up(generation_id, CANCELLED_TIMED_OUT)
            if status == Generation.Status.QUEUED:
                raise ServiceError("timed out waiting for a generation worker", status=504)
            raise ServiceError("timed out waiting for the generation to finish", status=504)
        time.sleep(_POLL_INTERVAL_S)


def _generation_lost(generation: Generation, still_lost: QuerySet[Generation]) -> str | None:
    """A generation whose process died (jobs.end_lost) ends as an error
    (WORKER_LOST_MESSAGE). The web thread waiting on one looks for them, and generation
    workers every few seconds: a lost generation is never left running, and no longer
    holds back the redelivery of the queued ones (jobs.redeliver)."""
    if generations_finish_with_error([generation.pk], WORKER_LOST_MESSAGE, among=still_lost):
        return "ended in error"
    return None


GENERATIONS = jobs.JobKind(
    model=Generation,
    label="generation",
    task="training_app.tasks.generate_task",
    task_name="generation",
    queue_setting="GENERATION_QUEUE",
    stale_after_setting="SDXL_WORKER_STALE_AFTER",
    timeout_setting="SDXL_GENERATION_TIMEOUT",
    on_lost=_generation_lost,
)


def generation_cancel(
    generation_id: int, reason: str = CANCELLED_BY_REQUEST, caller: Caller | None = None
) -> Generation:
    """Cancels a queued or running generation (404 unknown or the `caller`'s owner's not);
    returns it as it is now.

    A queued one is then never run; a running one stops at its worker's next look at the
    row, between denoising steps (at most SDXL's progress interval later), and writes no
    image. One that has already ended is returned unchanged, as Replicate's cancel does.
    """
    generation_get(generation_id, caller)
    cancelled = jobs.finish(
        Generation.objects.filter(pk=generation_id, status__in=Generation.ACTIVE_STATUSES),
        Generation.Status.CANCELLED,
        error_message=reason,
    )
    if cancelled:
        logger.info("generation %s %s", generation_id, reason)
        # The "failed" event, as for a cancelled training run: the body says "cancelled".
        generations_event([generation_id], "failed")
    return generation_get(generation_id)


def _give_up(generation_id: int, reason: str) -> None:
    """The caller stops waiting: a queued generation is abandoned, a running one cancelled."""
    _abandon(generation_id)
    if Generation.objects.filter(pk=generation_id, status=Generation.Status.RUNNING).exists():
        generation_cancel(generation_id, reason)


def generation_image_path(generation: Generation, index: int, extension: str) -> Path:
    """Image `index` of a completed generation, asked for as `<index>.<extension>`; 404
    for any image the generation does not have (another extension included)."""
    filename = f"{index}.{extension}"
    path = generations_dir(generation.pk) / filename
    if (
        generation.status != Generation.Status.COMPLETED
        or not 0 <= index < generation.image_count
        or generation.image_filename(index) != filename
        or not path.is_file()
    ):
        raise ServiceError(f"generation {generation.pk} has no image {filename}", status=404)
    return path


def _abandon(generation_id: int) -> None:
    """A request nobody waits for any more is not worth a worker's time."""
    jobs.finish(
        Generation.objects.filter(pk=generation_id, status=Generation.Status.QUEUED),
        Generation.Status.ABANDONED,
    )


def generations_event(generation_ids: list[int], event: str, to_webhook: bool = True) -> None:
    """Records an event of each generation (its event log; its webhook if its request asked
    for it): its GET /generations/<id> answer as it is now."""
    for generation in Generation.objects.filter(pk__in=generation_ids).prefetch_related(
        "applied_loras"
    ):
        webhook_emit(generation, event, generation_status_body(generation), to_webhook)


def generations_finish_with_error(
    generation_ids: list[int], message: str, among: QuerySet[Generation] | None = None
) -> list[int]:
    """Ends those of the generations still running (in `among`, else any running one) as an
    error; returns their ids. A request in error keeps no images: a batch that failed while
    writing may have written some."""
    running = Generation.objects.filter(status=Generation.Status.RUNNING)
    ended = [
        generation_id
        for generation_id in generation_ids
        if jobs.finish(
            (among if among is not None else running).filter(pk=generation_id),
            Generation.Status.ERROR,
            error_message=message,
        )
    ]
    for generation_id in ended:
        shutil.rmtree(generations_dir(generation_id), ignore_errors=True)
    if ended:
        generations_event(ended, "failed")
        logger.warning("generations %s ended in error: %s", ended, message)
    return ended
