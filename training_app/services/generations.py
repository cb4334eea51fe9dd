"""Image generation requests: recorded in the database, run by the generation worker.

The web process records a Generation, enqueues its id once committed, and waits on the
row; the worker claims the row, generates, writes the PNGs and marks the row finished.
"""

import io
import json
import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from PIL.PngImagePlugin import PngInfo

from core.errors import ServiceError
from sdxl_engine.errors import EngineError
from sdxl_engine.parameters import (
    DEFAULT_REFINER_POLICY,
    DEFAULT_REFINER_SWITCH,
    GENERATION_DEFAULTS,
    refiner_problem,
)
from sdxl_engine.schedulers import SCHEDULERS, unknown_scheduler_message
from sessions_app import storage
from sessions_app.selectors import session_get
from training_app.models import Generation, LoraArtifact, TrainingCheckpoint
from training_app.queueing import enqueue, redeliver_lost
from training_app.selectors import lora_file_get, worker_alive
from training_app.services.loras import lora_file_path

logger = logging.getLogger(__name__)

# Seeds fit a signed 64-bit column (PostgreSQL bigint) and torch.Generator alike.
SEED_BITS = 63
_POLL_INTERVAL_S = 0.1

WORKER_LOST_MESSAGE = "the generation worker was lost (killed or crashed) during this request"
NO_WORKER_MESSAGE = (
    "no generation worker is running; start the service with `python manage.py serve` "
    "(or a worker alone with `python manage.py worker generation`)"
)


@dataclass(frozen=True)
class GenerationRequest:
    """One /txt2img request; what it leaves out takes the engine's defaults."""

    prompt: str
    negative_prompt: str = GENERATION_DEFAULTS.negative_prompt
    num_images: int = GENERATION_DEFAULTS.num_images
    height: int = GENERATION_DEFAULTS.height
    width: int = GENERATION_DEFAULTS.width
    guidance_scale: float = GENERATION_DEFAULTS.guidance_scale
    steps: int = GENERATION_DEFAULTS.steps
    use_lora: bool = False
    session_id: int | None = None
    iteration: int | None = None
    lora_filename: str | None = None  # any LoRA file of the session, checkpoints included
    lora_scale: float = GENERATION_DEFAULTS.lora_scale
    seed: int | None = None
    scheduler: str | None = None  # a name of SCHEDULERS; None: the model's own (Euler)
    refiner: str | None = None  # "ensemble" or "none"; None: "ensemble"
    refiner_switch: float | None = None  # the Base's share under "ensemble"; None: 0.8


def generations_dir(generation_id: int) -> Path:
    return settings.GENERATIONS_DIR / str(generation_id)


def generation_request(request: GenerationRequest) -> Generation:
    """Records the request and enqueues it; 503 when no generation worker is alive."""
    if not worker_alive(settings.GENERATION_QUEUE):
        raise ServiceError(NO_WORKER_MESSAGE, status=503)
    if request.scheduler is not None and request.scheduler not in SCHEDULERS:
        raise ServiceError(unknown_scheduler_message())
    _check_refiner(request)
    lora = None
    if request.use_lora:
        session_get(request.session_id)
        lora = lora_file_get(request.session_id, request.iteration, request.lora_filename)
    with transaction.atomic():
        generation = Generation.objects.create(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            parameters={
                "num_images": request.num_images,
                "height": request.height,
                "width": request.width,
                "guidance_scale": request.guidance_scale,
                "steps": request.steps,
                "lora_scale": request.lora_scale,
                # Only when given: a request without it runs exactly as before the field.
                **({"scheduler": request.scheduler} if request.scheduler is not None else {}),
                **({"refiner": request.refiner} if request.refiner is not None else {}),
                **(
                    {"refiner_switch": request.refiner_switch}
                    if request.refiner_switch is not None
                    else {}
                ),
            },
            seed=request.seed if request.seed is not None else secrets.randbits(SEED_BITS),
            session_id=request.session_id if request.use_lora else None,
            lora=lora if isinstance(lora, LoraArtifact) else None,
            checkpoint=lora if isinstance(lora, TrainingCheckpoint) else None,
            lora_filename=lora.filename if lora else "",
            lora_sha256=lora.sha256 if lora else "",
        )
        transaction.on_commit(lambda: _enqueue_generation(generation.pk))
    return generation


def _check_refiner(request: GenerationRequest) -> None:
    if request.refiner == "none" and request.refiner_switch is not None:
        raise ServiceError(REFINER_SWITCH_WITHOUT_REFINER)
    problem = refiner_problem(
        request.refiner or DEFAULT_REFINER_POLICY,
        DEFAULT_REFINER_SWITCH if request.refiner_switch is None else request.refiner_switch,
    )
    if problem:
        raise ServiceError(problem)


REFINER_SWITCH_WITHOUT_REFINER = (
    'refiner_switch applies only when refiner is "ensemble": with "none" the Base runs the '
    "whole schedule"
)


def _enqueue_generation(generation_id: int) -> None:
    enqueue(
        "training_app.tasks.generate_task",
        Generation,
        generation_id,
        settings.GENERATION_QUEUE,
        f"generation-{generation_id}",
    )


def generations_redeliver() -> list[int]:
    """Hands queued generations whose task was lost back to the generation queue (see
    queueing.redeliver_lost); returns their ids. Generation workers call it every few
    seconds: a caller still waiting gets its images late instead of a timeout."""
    return redeliver_lost(
        Generation,
        settings.GENERATION_QUEUE,
        _enqueue_generation,
        waited_s=settings.SDXL_WORKER_STALE_AFTER,
        job_timeout_s=settings.SDXL_GENERATION_TIMEOUT,
    )


def generation_wait(generation_id: int, timeout_s: float) -> tuple[Generation, list[bytes]]:
    """Waits for the worker to finish the generation; returns the row and its PNG bytes."""
    deadline = time.monotonic() + timeout_s
    while True:
        generation = Generation.objects.get(pk=generation_id)
        if generation.status == Generation.Status.COMPLETED:
            folder = generations_dir(generation_id)
            images = [(folder / f"{i}.png").read_bytes() for i in range(generation.image_count)]
            return generation, images
        if generation.status == Generation.Status.ERROR:
            raise ServiceError(f"generation failed: {generation.error_message}", status=500)
        if generation.status == Generation.Status.QUEUED:
            if not worker_alive(settings.GENERATION_QUEUE):
                _abandon(generation_id)
                raise ServiceError(NO_WORKER_MESSAGE, status=503)
            if time.monotonic() > deadline:
                _abandon(generation_id)
                raise ServiceError("timed out waiting for a generation worker", status=504)
        elif not worker_alive(settings.GENERATION_QUEUE):
            # No generation worker beats any more: the one running this job died with it.
            _finish_generation_with_error(generation_id, WORKER_LOST_MESSAGE)
            raise ServiceError(WORKER_LOST_MESSAGE, status=503)
        elif time.monotonic() > deadline:
            raise ServiceError("timed out waiting for the generation to finish", status=504)
        time.sleep(_POLL_INTERVAL_S)


def _abandon(generation_id: int) -> None:
    """A request nobody waits for any more is not worth a worker's time."""
    Generation.objects.filter(pk=generation_id, status=Generation.Status.QUEUED).update(
        status=Generation.Status.ABANDONED, finished_at=timezone.now()
    )


def infotext(record: dict) -> str:
    """The parameters as AUTOMATIC1111 writes them into a PNG's `parameters` chunk.

    That layout (the prompt, "Negative prompt: ...", then one line of "Key: value" pairs)
    is what its PNG Info, ComfyUI, InvokeAI and image sites read back.
    """
    pairs = {"Steps": record["steps"]}
    # A1111 writes the sampler after the steps. Before 1.9 it names the schedule inside the
    # sampler ("DPM++ 2M Karras"); 1.9+ writes "DPM++ 2M" plus "Schedule type: Karras". The
    # older single name is written: every version of A1111 and the tools that copy its
    # layout read it back.
    if record.get("scheduler"):
        pairs["Sampler"] = SCHEDULERS[record["scheduler"]].a1111_name
    pairs |= {
        "CFG scale": record["guidance_scale"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["model"],
    }
    # Without the Refiner (refiner "none") A1111 writes no Refiner keys either.
    if record["refiner"]:
        pairs["Refiner"] = record["refiner"]
        pairs["Refiner switch at"] = record["refiner_switch_at"]
    if record["lora"]:
        pairs.update(
            {
                "Lora": record["lora"],
                "Lora weight": record["lora_scale"],
                "Lora sha256": record["lora_sha256"],
            }
        )
    lines = [record["prompt"]]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_infotext_value(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def _infotext_value(value) -> str:
    # AUTOMATIC1111 quotes a value that holds its separators, JSON-style.
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _png_bytes(image, record: dict) -> bytes:
    """The PNG, its parameters in text chunks: `parameters` for SDXL tools (infotext),
    `sdxl_service` (every field, as JSON) for programs."""
    info = PngInfo()
    info.add_text("parameters", infotext(record))
    info.add_text("sdxl_service", json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def generation_execute(generation_id: int) -> None:
    """Runs a queued generation (in the generation worker), together with the queued
    requests that can share its batch (`_claim_companions`); one already taken is left
    alone, so the tasks of requests that ran in an earlier batch do nothing."""
    from sdxl_engine.generation import GenerationJob, generate_batch
    from training_app.runtime import generation_pipelines

    if not _claim(generation_id):
        logger.info("generation %s is not queued any more; nothing to do", generation_id)
        return
    lead = Generation.objects.get(pk=generation_id)
    batch = [lead, *_claim_companions(lead)]
    ids = [generation.pk for generation in batch]
    if len(batch) > 1:
        logger.info("generations %s run as one batch", ids)
    params = lead.parameters
    refiner = _batch_value(params, "refiner")
    refiner_switch = _batch_value(params, "refiner_switch")
    ensemble = refiner == "ensemble"
    started = time.monotonic()
    try:
        lora_path = None
        if lead.lora_filename:
            lora = lead.lora or lead.checkpoint
            if lora is None:
                raise ServiceError(f"{lead.lora_filename} was deleted before generation")
            lora_path = lora_file_path(lora)
        pipelines = generation_pipelines()
        images_per_job = generate_batch(
            pipelines,
            [
                GenerationJob(
                    prompt=generation.prompt,
                    negative_prompt=generation.negative_prompt,
                    num_images=generation.parameters["num_images"],
                    seed=generation.seed,
                )
                for generation in batch
            ],
            height=params["height"],
            width=params["width"],
            guidance_scale=params["guidance_scale"],
            steps=params["steps"],
            lora_path=lora_path,
            lora_scale=params["lora_scale"],
            scheduler=params.get("scheduler"),
            refiner=refiner,
            refiner_switch=refiner_switch,
        )
        for generation, images in zip(batch, images_per_job, strict=True):
            record = {
                "prompt": generation.prompt,
                "negative_prompt": generation.negative_prompt,
                "seed": generation.seed,
                "lora": generation.lora_filename or None,
                "lora_sha256": generation.lora_sha256 or None,
                "model": pipelines.source.base,
                # The Refiner model and the switch used; both null when it did not run.
                "refiner": pipelines.source.refiner if ensemble else None,
                "refiner_switch_at": refiner_switch if ensemble else None,
                **{
                    name: value
                    for name, value in generation.parameters.items()
                    if name not in ("refiner", "refiner_switch")
                },
            }
            folder = generations_dir(generation.pk)
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(images):
                storage.atomic_write_bytes(folder / f"{index}.png", _png_bytes(image, record))
    except (EngineError, ServiceError) as error:
        _finish_generations_with_error(ids, getattr(error, "message", str(error)))
        return
    except Exception as error:
        logger.exception("generations %s failed", ids)
        _finish_generations_with_error(ids, f"{type(error).__name__}: {error}")
        return
    duration_ms = int((time.monotonic() - started) * 1000)
    for generation, images in zip(batch, images_per_job, strict=True):
        Generation.objects.filter(pk=generation.pk).update(
            status=Generation.Status.COMPLETED,
            image_count=len(images),
            duration_ms=duration_ms,
            finished_at=timezone.now(),
        )


def _claim(generation_id: int) -> bool:
    """Takes a queued generation for this worker; False when it is not queued (any more)."""
    return bool(
        Generation.objects.filter(pk=generation_id, status=Generation.Status.QUEUED).update(
            status=Generation.Status.RUNNING, started_at=timezone.now()
        )
    )


# What requests must share to run in one batch: one size, schedule, sampler, guidance and
# refiner policy and switch for the pipelines' call, one LoRA file (by content) at one scale
# merged into the Base. Rows recorded before a field, or whose request left it out, have no
# key: compared with their default (_BATCH_DEFAULTS, else None), so a row without "refiner"
# batches with one that gave "ensemble".
_BATCH_PARAMETERS = (
    "height",
    "width",
    "steps",
    "guidance_scale",
    "lora_scale",
    "scheduler",
    "refiner",
    "refiner_switch",
)
_BATCH_DEFAULTS = {"refiner": DEFAULT_REFINER_POLICY, "refiner_switch": DEFAULT_REFINER_SWITCH}


def _batch_value(parameters: dict, name: str):
    return parameters.get(name, _BATCH_DEFAULTS.get(name))


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
        Generation.objects.filter(
            status=Generation.Status.QUEUED,
            lora_filename=lead.lora_filename,
            lora_sha256=lead.lora_sha256,
        )
        .exclude(pk=lead.pk)
        .order_by("pk")
    )
    companions = []
    for candidate in candidates[: 4 * settings.SDXL_GENERATION_BATCH_IMAGES]:
        images = candidate.parameters["num_images"]
        if images > room or any(
            _batch_value(candidate.parameters, name) != _batch_value(lead.parameters, name)
            for name in _BATCH_PARAMETERS
        ):
            continue
        if _claim(candidate.pk):
            candidate.refresh_from_db()
            companions.append(candidate)
            room -= images
    return companions


def _finish_generation_with_error(generation_id: int, message: str) -> None:
    _finish_generations_with_error([generation_id], message)


def _finish_generations_with_error(generation_ids: list[int], message: str) -> None:
    # A batch that failed while writing may have written some of its requests' images:
    # a request in error keeps none.
    for generation_id in generation_ids:
        shutil.rmtree(generations_dir(generation_id), ignore_errors=True)
    Generation.objects.filter(pk__in=generation_ids).update(
        status=Generation.Status.ERROR, error_message=message, finished_at=timezone.now()
    )
    logger.warning("generations %s ended in error: %s", generation_ids, message)
