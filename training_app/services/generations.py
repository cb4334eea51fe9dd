"""Image generation requests: recorded in the database, run by the generation worker.

The web process records a Generation, enqueues its id once committed, and waits on the
row; the worker claims the row, generates, writes the PNGs and marks the row finished.
While it runs, the job's process keeps the row's heartbeat fresh: a running row whose
heartbeat went stale lost its process and is ended as an error (_generation_lost). A
generation nobody wants any more (its client went away or was answered 504, or POST
/generations/<id>/cancel) is cancelled: the worker stops between denoising steps.
"""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet

from access_app.callers import Caller
from core.errors import ServiceError
from sdxl_engine.errors import EngineError, GenerationCancelled
from sdxl_engine.image_output import lora_prompt_name, lora_short_hash
from sdxl_engine.parameters import DEFAULT_LORA_SCALE, GenerationParams, LoraChoice, image_seeds
from sessions_app import storage
from sessions_app.images import check_image
from sessions_app.selectors import session_get
from training_app import jobs
from training_app.bodies import generation_status_body
from training_app.models import (
    Generation,
    GenerationLora,
    LoraArtifact,
    TrainingCheckpoint,
)
from training_app.selectors import generation_get, lora_file_get, worker_alive
from training_app.services.loras import lora_file_path
from training_app.services.owner_quotas import generation_owner
from training_app.services.webhooks import progress_tenth, webhook_emit, webhook_target_check

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.1
# img2img's starting image, kept in the generation's folder as it was sent.
INIT_IMAGE_NAME = "init_image"

WORKER_LOST_MESSAGE = "the generation worker was lost (killed or crashed) during this request"
# Why a generation was cancelled (its message, GET /generations/<id>).
CANCELLED_BY_REQUEST = "cancelled by POST /generations/<id>/cancel"
CANCELLED_CLIENT_GONE = "cancelled: the client disconnected before it finished"
CANCELLED_TIMED_OUT = "cancelled: its client was answered 504 (SDXL_TXT2IMG_TIMEOUT) first"
NO_WORKER_MESSAGE = (
    "no generation worker is running; start the service with `python manage.py serve` "
    "(or a worker alone with `python manage.py worker generation`)"
)


@dataclass(frozen=True)
class GenerationRequest(GenerationParams):
    """One /txt2img request as the service takes it: its GenerationParams, checked by the
    caller (the API's serializer maps their problems() to 400s; the engine refuses what
    slips through), and the fields that are not params because they do not change the
    images (a param is what the engine renders and the row's JSON records):

    - `use_lora` with `session_id` (and iteration, lora_filename, lora_scale): the original
      API's shorthand for one LoRA, which `params` puts first in `loras` (not together
      with them: the serializer refuses both);
    - where to post its events and which (services.webhooks);
    - who asks (the API's caller): sees only its owner's LoRAs, owns the generation.
    """

    use_lora: bool = False
    session_id: int | None = None
    iteration: int | None = None
    lora_filename: str | None = None  # any LoRA file of the session, checkpoints included
    lora_scale: float = DEFAULT_LORA_SCALE
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()  # none given: the default ones
    caller: Caller | None = None

    @property
    def params(self) -> GenerationParams:
        """The request's params, the use_lora shorthand as its first LoRA."""
        given = {field.name: getattr(self, field.name) for field in fields(GenerationParams)}
        params = GenerationParams(**given)
        if not self.use_lora:
            return params
        shorthand = LoraChoice(self.session_id, self.iteration, self.lora_filename, self.lora_scale)
        return replace(params, loras=(shorthand, *self.loras))


def generations_dir(generation_id: int) -> Path:
    return settings.GENERATIONS_DIR / str(generation_id)


def generation_request(request: GenerationRequest) -> Generation:
    """Records the request and enqueues it; 503 when no generation worker is alive, 404 for
    a LoRA that is not there (or not the caller's owner's), 400 for an init_image that is
    not an image. The params themselves are the caller's to have checked (problems())."""
    if not worker_alive(settings.GENERATION_QUEUE):
        raise ServiceError(NO_WORKER_MESSAGE, status=503)
    params = request.params.filled()
    if params.init_image is not None:
        check_image(params.init_image, field="init_image_base64")
    webhook_url, webhook_events = webhook_target_check(
        request.webhook_url, list(request.webhook_events)
    )
    loras = [
        # use_lora answers the original API's 404 message unchanged.
        (choice, _lora_of(choice, request.caller, named=not (request.use_lora and position == 0)))
        for position, choice in enumerate(params.loras)
    ]
    written: list[Path] = []
    try:
        with transaction.atomic():
            owner_id = generation_owner(request.caller)
            generation = _generation_create(
                params, loras, (webhook_url, webhook_events), written, owner_id
            )
    except BaseException:
        # The row was rolled back: so is the starting image written for it.
        for folder in written:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return generation


def _generation_create(
    params: GenerationParams,
    loras: list[tuple[LoraChoice, LoraArtifact | TrainingCheckpoint]],
    webhook: tuple[str, list[str]],
    written: list[Path],
    owner_id: int,
) -> Generation:
    generation = Generation.objects.create(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        parameters=params.record(),
        seed=params.seed,
        owner_id=owner_id,
        session_id=loras[0][0].session_id if loras else None,
        webhook_url=webhook[0],
        webhook_events=webhook[1],
    )
    GenerationLora.objects.bulk_create(
        GenerationLora(
            generation=generation,
            position=position,
            lora=lora if isinstance(lora, LoraArtifact) else None,
            checkpoint=lora if isinstance(lora, TrainingCheckpoint) else None,
            source_session_id=choice.session_id,
            filename=lora.filename,
            sha256=lora.sha256,
            scale=choice.scale,
        )
        for position, (choice, lora) in enumerate(loras)
    )
    if params.init_image is not None:
        folder = generations_dir(generation.pk)
        written.append(folder)
        folder.mkdir(parents=True, exist_ok=True)
        storage.atomic_write_bytes(folder / INIT_IMAGE_NAME, params.init_image)
    jobs.enqueue_on_commit(GENERATIONS, generation.pk)
    return generation


def _lora_of(
    choice: LoraChoice, caller: Caller | None, named: bool
) -> LoraArtifact | TrainingCheckpoint:
    """The LoRA file a choice names; 404 naming the session, the file or (when `named`)
    the iteration when missing (or the caller's owner's not)."""
    session_get(choice.session_id, caller)
    if choice.lora_filename is not None or not named:
        return lora_file_get(choice.session_id, choice.iteration, choice.lora_filename)
    try:
        return lora_file_get(choice.session_id, choice.iteration)
    except ServiceError as error:
        wanted = "its latest" if choice.iteration is None else f"iteration {choice.iteration}"
        raise ServiceError(
            f"{error.message}: {wanted} of session {choice.session_id}", status=error.status
        ) from None


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


def _generation_lost(generation: Generation, still_lost: QuerySet) -> str | None:
    """A generation whose process died (jobs.end_lost) ends as an error
    (WORKER_LOST_MESSAGE). The web thread waiting on one looks for them, and generation
    workers every few seconds: a lost generation is never left running, and no longer
    holds back the redelivery of the queued ones (jobs.redeliver)."""
    if _finish_generations_with_error([generation.pk], WORKER_LOST_MESSAGE, among=still_lost):
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


def generation_execute(generation_id: int) -> None:
    """Runs a queued generation (in the generation worker), together with the queued
    requests that can share its batch (`_claim_companions`); one already taken is left
    alone, so the tasks of requests that ran in an earlier batch do nothing."""
    if not jobs.claim(GENERATIONS, generation_id):
        logger.info("generation %s is not queued any more; nothing to do", generation_id)
        return
    lead = Generation.objects.prefetch_related("applied_loras").get(pk=generation_id)
    batch = [lead, *_claim_companions(lead)]
    ids = [generation.pk for generation in batch]
    with jobs.heartbeat(GENERATIONS, ids):
        _execute_batch(lead, batch)


def _execute_batch(lead: Generation, batch: list[Generation]) -> None:
    """Generates the claimed batch and writes the images of the requests still wanted;
    ends them completed, or in error, or leaves those cancelled meanwhile cancelled."""
    from sdxl_engine.generation import AppliedLora, generate_batch
    from sdxl_engine.image_output import encode_image
    from training_app.runtime import generation_pipelines

    ids = [generation.pk for generation in batch]
    held_here = jobs.held_here(GENERATIONS, *ids)
    generations_event(ids, "started")
    if len(batch) > 1:
        logger.info("generations %s run as one batch", ids)
    started = time.monotonic()
    try:
        requests = [_params_to_render(generation) for generation in batch]
        applied = list(lead.applied_loras.all())
        paths = [_lora_path(lora) for lora in applied]
        names = _prompt_names(applied)
        loras_used = [
            {
                "name": names[position],
                "filename": lora.filename,
                "session_id": lora.source_session_id,
                "sha256": lora.sha256,
                "short_hash": lora_short_hash(path),
                "scale": lora.scale,
            }
            for position, (lora, path) in enumerate(zip(applied, paths, strict=True))
        ]
        pipelines = generation_pipelines()
        images_per_job = generate_batch(
            pipelines,
            requests,
            loras=[
                AppliedLora(path, lora.scale) for lora, path in zip(applied, paths, strict=True)
            ],
            on_step=_progress_recorder(ids),
        )
        wanted = set(held_here.values_list("pk", flat=True))
        for generation, params, images in zip(batch, requests, images_per_job, strict=True):
            if generation.pk not in wanted:
                continue  # cancelled (or judged lost) while the batch ran: no images
            record = {
                "prompt": generation.prompt,
                "negative_prompt": generation.negative_prompt,
                "loras": loras_used,
                # The first LoRA under the names the record had before `loras`.
                "lora": loras_used[0]["filename"] if loras_used else None,
                "lora_sha256": loras_used[0]["sha256"] if loras_used else None,
                "lora_scale": loras_used[0]["scale"] if loras_used else None,
                "model": pipelines.source.base,
                # The Refiner model and the switch used; both null when it did not run.
                "refiner": (
                    pipelines.source.refiner if params.refiner_policy == "ensemble" else None
                ),
                "refiner_switch_at": params.refiner_switch_at,
                "scheduler": params.scheduler,
                "strength": params.strength,
                **{
                    name: value
                    for name, value in generation.parameters.items()
                    if name not in ("refiner", "refiner_switch", "quality")
                },
            }
            folder = generations_dir(generation.pk)
            folder.mkdir(parents=True, exist_ok=True)
            seeds = image_seeds(generation.seed, len(images))
            for index, (image, seed) in enumerate(zip(images, seeds, strict=True)):
                storage.atomic_write_bytes(
                    folder / generation.image_filename(index),
                    encode_image(
                        image,
                        {**record, "seed": seed},
                        params.file_format,
                        params.quality,
                    ),
                )
    except GenerationCancelled:
        logger.info("generations %s cancelled between steps", ids)
        return
    except (EngineError, ServiceError) as error:
        _finish_generations_with_error(ids, getattr(error, "message", str(error)), held_here)
        return
    except Exception as error:
        logger.exception("generations %s failed", ids)
        _finish_generations_with_error(ids, f"{type(error).__name__}: {error}", held_here)
        return
    duration_ms = int((time.monotonic() - started) * 1000)
    completed = []
    for generation, images in zip(batch, images_per_job, strict=True):
        finished = jobs.finish(
            jobs.held_here(GENERATIONS, generation.pk),
            Generation.Status.COMPLETED,
            image_count=len(images),
            duration_ms=duration_ms,
        )
        if finished:
            completed.append(generation.pk)
        else:  # cancelled while its images were written: it keeps none
            shutil.rmtree(generations_dir(generation.pk), ignore_errors=True)
    generations_event(completed, "completed")


def generations_event(generation_ids: list[int], event: str) -> None:
    """Records a webhook event of each generation (if its request asked for it): its
    GET /generations/<id> answer as it is now."""
    # Only requests with a webhook: the body is built on the hot path (each tenth of steps).
    subscribed = Generation.objects.filter(pk__in=generation_ids).exclude(webhook_url="")
    for generation in subscribed.prefetch_related("applied_loras"):
        webhook_emit(generation, event, generation_status_body(generation))


# Progress is written at most this often (and at the last step): a database write per
# denoising step would cost more than the step on a fast GPU.
_PROGRESS_INTERVAL_S = 0.25


def _progress_recorder(generation_ids: list[int]):
    """An on_step callback recording each batch request's steps done (GET /generations).
    Writing only to the rows still running here, it learns which are wanted: when none
    is (all cancelled, or judged lost), it stops the batch between steps."""
    last_written = 0.0

    def record(done: int, total: int) -> None:
        nonlocal last_written
        # A tenth of the steps passed: a progress webhook event, with the row up to date.
        crossed = progress_tenth(done, total) > progress_tenth(done - 1, total)
        now = time.monotonic()
        if done < total and not crossed and now - last_written < _PROGRESS_INTERVAL_S:
            return
        last_written = now
        if not jobs.held_here(GENERATIONS, *generation_ids).update(step=done, total_steps=total):
            raise GenerationCancelled(f"generations {generation_ids} are no longer wanted")
        if crossed:
            generations_event(generation_ids, "progress")

    return record


def _params_to_render(generation: Generation) -> GenerationParams:
    """The generation's params with the img2img image its request sent (checked when it
    was recorded), as the engine renders them."""
    params = generation.params
    if params.strength is None:
        return params
    init_image = (generations_dir(generation.pk) / INIT_IMAGE_NAME).read_bytes()
    return replace(params, init_image=init_image)


def _prompt_names(loras: list[GenerationLora]) -> list[str]:
    """Each LoRA's name in the infotext (`<lora:NAME:scale>`): its file name without
    .safetensors, and the session (`lora_1_s12`) where files of one name meet."""
    stems = [lora_prompt_name({"filename": lora.filename}) for lora in loras]
    return [
        f"{stem}_s{lora.source_session_id}" if stems.count(stem) > 1 else stem
        for stem, lora in zip(stems, loras, strict=True)
    ]


def _lora_path(lora: GenerationLora) -> Path:
    """The file a generation's LoRA row names, still holding the bytes it was asked for."""
    artifact = lora.lora or lora.checkpoint
    if artifact is None or artifact.sha256 != lora.sha256:
        raise ServiceError(f"{lora.filename} was deleted before generation")
    return lora_file_path(artifact)


def _loras_key(generation: Generation) -> list[tuple[str, float]]:
    """The generation's LoRAs as the Base gets them: each file's content and scale, in order."""
    return [(lora.sha256, lora.scale) for lora in generation.applied_loras.all()]


def _claim_companions(lead: Generation) -> list[Generation]:
    """Claims the oldest queued generations that can run in `lead`'s batch, while the
    batch holds at most SDXL_GENERATION_BATCH_IMAGES images; returns them in that order.

    Their own tasks, delivered later, find them taken and do nothing; a worker lost
    meanwhile leaves them running, which generation_wait reports like any lost job.
    """
    room = settings.SDXL_GENERATION_BATCH_IMAGES - lead.parameters["num_images"]
    if room <= 0:
        return []
    candidates = (
        Generation.objects.filter(status=Generation.Status.QUEUED)
        .exclude(pk=lead.pk)
        .prefetch_related("applied_loras")
        .order_by("pk")
    )
    loras, batch_key = _loras_key(lead), lead.params.batch_key()
    companions = []
    for candidate in candidates[: 4 * settings.SDXL_GENERATION_BATCH_IMAGES]:
        images = candidate.parameters["num_images"]
        # The same params' batch_key (GenerationParams.batch_key) and the same LoRA files
        # at the same scales, merged into the Base: the rest is each request's own.
        if (
            images > room
            or candidate.params.batch_key() != batch_key
            or _loras_key(candidate) != loras
        ):
            continue
        if jobs.claim(GENERATIONS, candidate.pk):
            candidate.refresh_from_db()
            companions.append(candidate)
            room -= images
    return companions


def _finish_generations_with_error(
    generation_ids: list[int], message: str, among: QuerySet | None = None
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
