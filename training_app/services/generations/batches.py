"""The generation worker's part: a queued generation runs together with the queued
requests that can share its batch; their images are written and the rows marked finished."""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from django.conf import settings

from core.errors import ServiceError
from sdxl_engine.errors import EngineError, GenerationCancelled
from sdxl_engine.image_output import lora_prompt_name, lora_short_hash
from sdxl_engine.parameters import GenerationParams, image_seeds
from sessions_app import storage
from training_app import jobs
from training_app.models import Generation, GenerationLora
from training_app.services.generations.lifecycle import (
    GENERATIONS,
    INIT_IMAGE_NAME,
    MASK_IMAGE_NAME,
    generations_dir,
    generations_event,
    generations_finish_with_error,
)
from training_app.services.loras import lora_file_path
from training_app.services.webhooks import STREAM_PROGRESS_EVENTS, progress_crossed

logger = logging.getLogger(__name__)


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
    from sdxl_engine.generation import AppliedLora
    from sdxl_engine.generation.render import render_batch
    from sdxl_engine.image_output import encode_image
    from training_app.runtime import generation_pipelines

    ids = [generation.pk for generation in batch]
    held_here = jobs.held_here(GENERATIONS, *ids)
    generations_event(ids, "started")
    if len(batch) > 1:
        logger.info("generations %s run as one batch", ids)
    started = time.monotonic()
    stored_bytes: dict[int, int] = {}  # each generation's folder, once its images are in
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
        rendered = render_batch(
            pipelines,
            requests,
            loras=[
                AppliedLora(path, lora.scale) for lora, path in zip(applied, paths, strict=True)
            ],
            on_step=_progress_recorder(ids),
        )
        images_per_job = [result.images for result in rendered]
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
                "model": pipelines.source.base_name,
                # The Refiner model and the switch used; both null when it did not run.
                "refiner": (
                    pipelines.source.refiner_name if params.refiner_policy == "ensemble" else None
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
            stored_bytes[generation.pk] = sum(path.stat().st_size for path in folder.iterdir())
    except GenerationCancelled:
        logger.info("generations %s cancelled between steps", ids)
        return
    except (EngineError, ServiceError) as error:
        generations_finish_with_error(ids, getattr(error, "message", str(error)), held_here)
        return
    except Exception as error:
        logger.exception("generations %s failed", ids)
        generations_finish_with_error(ids, f"{type(error).__name__}: {error}", held_here)
        return
    duration_ms = int((time.monotonic() - started) * 1000)
    completed = []
    for generation, result in zip(batch, rendered, strict=True):
        finished = jobs.finish(
            jobs.held_here(GENERATIONS, generation.pk),
            Generation.Status.COMPLETED,
            image_count=len(result.images),
            # Per image, how many faces the face detail pass redid; None without it.
            faces_redone=result.faces_redone,
            duration_ms=duration_ms,
            stored_bytes=stored_bytes.get(generation.pk, 0),
        )
        if finished:
            completed.append(generation.pk)
        else:  # cancelled while its images were written: it keeps none
            shutil.rmtree(generations_dir(generation.pk), ignore_errors=True)
    generations_event(completed, "completed")


# Progress is written at most this often (and at the last step): a database write per
# denoising step would cost more than the step on a fast GPU.
_PROGRESS_INTERVAL_S = 0.25


def _progress_recorder(generation_ids: list[int]) -> Callable[[int, int], None]:
    """An on_step callback recording each batch request's steps done (GET /generations).
    Writing only to the rows still running here, it learns which are wanted: when none
    is (all cancelled, or judged lost), it stops the batch between steps."""
    last_written = 0.0

    def record(done: int, total: int) -> None:
        nonlocal last_written
        # A tenth of the steps passed: a progress event (webhook and stream), with the row
        # up to date. In between the row is written at most every _PROGRESS_INTERVAL_S, and
        # the stream gets an event then if another hundredth passed: a fast GPU's steps
        # (~30 a second) cost no write each.
        tenth = progress_crossed(done, total)
        now = time.monotonic()
        if done < total and not tenth and now - last_written < _PROGRESS_INTERVAL_S:
            return
        last_written = now
        if not jobs.held_here(GENERATIONS, *generation_ids).update(step=done, total_steps=total):
            raise GenerationCancelled(f"generations {generation_ids} are no longer wanted")
        if tenth or progress_crossed(done, total, STREAM_PROGRESS_EVENTS):
            generations_event(generation_ids, "progress", to_webhook=tenth)

    return record


def _params_to_render(generation: Generation) -> GenerationParams:
    """The generation's params with the img2img image (and inpainting mask) its request
    sent (checked when it was recorded), as the engine renders them."""
    params = generation.params
    if params.strength is None:
        return params
    folder = generations_dir(generation.pk)
    init_image = (folder / INIT_IMAGE_NAME).read_bytes()
    # Inpainting with a mask (outpainting has none): it was stored beside the image.
    mask_file = folder / MASK_IMAGE_NAME
    mask = mask_file.read_bytes() if params.mask_blur is not None and mask_file.is_file() else None
    return replace(params, init_image=init_image, mask=mask)


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
