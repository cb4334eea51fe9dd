"""Owners' quotas on training and generation, counted under the owner's lock so that two
requests of one owner at the same moment cannot both take the last slot; and the bytes a
run or a generation is planned to write, which the stored-MB quota must hold."""

import math
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from access_app.callers import Caller
from access_app.models import Owner
from access_app.quotas import MB, owner_locked, quota_check
from access_app.selectors import (
    caller_owner_id,
    default_owner,
    owner_quota,
    owner_stored_bytes,
)
from core.errors import ServiceError
from sdxl_engine.lora_keys import TEXT_ENCODERS, UNET, is_target_projection
from sdxl_engine.parameters import (
    GenerationParams,
    TrainingParams,
    checkpoint_steps,
    sample_steps,
)
from sdxl_engine.source import planned_preset
from sessions_app.models import Session
from training_app.models import Generation, TrainingRun
from training_app.queue_selectors import seconds_per_image

RATE_WINDOW = timedelta(minutes=1)

# A LoRA file's size from its rank: the trainer saves float32 weights, a down (rank x in)
# and an up (out x rank) matrix per targeted module (sdxl_engine.training.adapters: the
# UNet's attention projections, and with train_text_encoder the text encoders'), plus the
# safetensors header: a JSON entry per tensor and the metadata, bounded at upload at 64 KB.
LORA_BYTES_PER_WEIGHT = 4
HEADER_BYTES_PER_TENSOR = 200
HEADER_METADATA_BYTES = 64 * 1024
_TEXT_ENCODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The weights per unit of rank when the web process cannot know the model's shapes (a real
# SDXL not downloaded here), SDXL's: its UNet's 70 transformer blocks (10 of width 640, 60
# of 1280) each hold to_q, to_k, to_v, to_out of self-attention ((d + d) x 4) and of
# cross-attention (to_k, to_v from the 2048-wide text: (d + d) x 2 + (2048 + d) x 2), so
# 14 d + 4096 per block: 1,451,520 (rank 32: 186 MB, as cog-sdxl's files); the text
# encoders' q, k, v, out: 12 layers of 768 and 32 of 1280, 401,408.
SDXL_UNET_WEIGHTS_PER_RANK = 1_451_520
SDXL_TEXT_ENCODER_WEIGHTS_PER_RANK = 401_408
SDXL_UNET_TENSORS = 70 * 8 * 2
SDXL_TEXT_ENCODER_TENSORS = (12 + 32) * 4 * 2
# An image file's bytes at most per pixel, by format: a PNG stores the 3 bytes of RGB and
# deflates them (a sample of the tiny model, mostly noise, hardly at all; SDXL's renders to
# 40-60%), so 3 is an upper bound; JPEG and WebP at the service's qualities keep well
# under 1 (SDXL renders: ~0.3 at quality 90).
IMAGE_BYTES_PER_PIXEL = {"png": 3.0, "jpeg": 1.0, "webp": 1.0}
IMAGE_HEADER_BYTES = 16 * 1024  # the generation record the service writes in each file


def training_slot_check(session: Session) -> None:
    """429 when the session's owner already runs (or queues) as many trainings as its
    quota allows. Call inside the transaction that creates the run."""
    if session.owner_id is None:
        return
    owner = owner_locked(session.owner_id)
    active = TrainingRun.objects.filter(
        session__owner=owner, status__in=TrainingRun.ACTIVE_STATUSES
    ).count()
    quota_check(owner, "max_concurrent_trainings", active)


def generation_owner(caller: Caller | None, planned_bytes: int = 0) -> int:
    """The owner a new generation belongs to; for an API caller, after checking its
    generations-per-minute quota (429 with Retry-After: when the oldest generation of the
    last minute leaves the window) and that its stored-MB quota holds the `planned_bytes`
    the generation will write. Call inside the transaction that creates the row."""
    if caller is None:  # not through the API: no quota
        return default_owner().pk
    owner = owner_locked(caller_owner_id(caller))
    if owner_quota(owner, "max_stored_mb") is not None:
        quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), planned_bytes, unit=MB)
    if owner_quota(owner, "max_generations_per_minute") is None:
        return owner.pk
    now = timezone.now()
    recent = Generation.objects.filter(owner=owner, created_at__gt=now - RATE_WINDOW)
    oldest = recent.order_by("created_at").values_list("created_at", flat=True).first()
    retry_after = (
        max(1, math.ceil((oldest + RATE_WINDOW - now).total_seconds())) if oldest else None
    )
    quota_check(owner, "max_generations_per_minute", recent.count(), retry_after=retry_after)
    return owner.pk


def queued_generations_check(owner_id: int, caller: Caller | None) -> None:
    """429 with Retry-After when SDXL_MAX_QUEUED_GENERATIONS generations already wait, or
    (for an API caller) as many of its owner's as its queued-generations quota allows.
    Call inside the transaction that creates the row, after `generation_owner` (which locks
    the owner: its count is exact; the global count may pass its bound by the requests of
    other owners created at that very moment, on PostgreSQL)."""
    queued = Generation.objects.filter(status=Generation.Status.QUEUED)
    limit = settings.SDXL_MAX_QUEUED_GENERATIONS
    if limit and queued.count() >= limit:
        raise ServiceError(
            f"the generation queue is full: {limit} generations wait, the most "
            "SDXL_MAX_QUEUED_GENERATIONS allows; nothing was written: retry after "
            "Retry-After seconds",
            status=429,
            retry_after=_queue_moves_after_s(),
        )
    if caller is not None:
        owner = owner_locked(owner_id)
        used = queued.filter(owner=owner).count()
        quota_check(owner, "max_queued_generations", used, retry_after=_queue_moves_after_s())


def _queue_moves_after_s() -> int:
    """Seconds until the queue has likely moved on by one request: the recent time per image
    (a request makes one at least); before any generation completed, a guess of 10 s."""
    per_image = seconds_per_image()
    return max(1, math.ceil(per_image)) if per_image is not None else 10


def lora_file_bytes(rank: int, train_text_encoder: bool) -> int:
    """About the bytes of a LoRA file the trainer writes at `rank` for the configured
    model (the largest, when the worker may load several): the weights are exact, the
    header an upper bound."""
    from training_app.services.loras import model_lora_target_shapes

    components = [UNET, *(TEXT_ENCODERS if train_text_encoder else ())]
    models = model_lora_target_shapes()
    if planned_preset(settings.SDXL_MODEL_PRESET or None) != "tiny":
        # A worker that may load a full-size model whose configs the web process has not
        # read (not downloaded here: only the packaged tiny ones are known) counts SDXL's.
        models = [*models, None]
    largest = 0
    for shapes in models:
        if shapes is None or any(shapes.get(component) is None for component in components):
            weights = SDXL_UNET_WEIGHTS_PER_RANK * rank
            tensors = SDXL_UNET_TENSORS
            if train_text_encoder:
                weights += SDXL_TEXT_ENCODER_WEIGHTS_PER_RANK * rank
                tensors += SDXL_TEXT_ENCODER_TENSORS
        else:
            targeted = [
                shape
                for component in components
                for module, shape in (shapes[component] or {}).items()
                if _is_trained(component, module)
            ]
            # A module's weight is (out, in, ...): the LoRA's down is rank x in, up out x rank.
            weights = sum(rank * (shape[0] + shape[1]) for shape in targeted)
            tensors = 2 * len(targeted)
        size = weights * LORA_BYTES_PER_WEIGHT + tensors * HEADER_BYTES_PER_TENSOR
        largest = max(largest, size + HEADER_METADATA_BYTES)
    return largest


def _is_trained(component: str, module: str) -> bool:
    if component == UNET:
        return is_target_projection(module)
    return module.rsplit(".", 1)[-1] in _TEXT_ENCODER_PROJECTIONS


def image_file_bytes(width: int, height: int, file_format: str) -> int:
    """At most about the bytes of a rendered image file (IMAGE_BYTES_PER_PIXEL)."""
    return int(width * height * IMAGE_BYTES_PER_PIXEL[file_format]) + IMAGE_HEADER_BYTES


def training_output_bytes(
    params: TrainingParams, total_steps: int, resolution: int, sample_prompt_count: int
) -> int:
    """The bytes a run is planned to write: its checkpoints and its final LoRA, and its
    sample images (one per prompt at each sample step, PNGs of resolution²)."""
    files = len(checkpoint_steps(params.checkpoint_every, total_steps)) + 1
    samples = len(sample_steps(params.sample_every, total_steps)) * sample_prompt_count
    return files * lora_file_bytes(params.rank, params.train_text_encoder) + (
        samples * image_file_bytes(resolution, resolution, "png")
    )


def generation_output_bytes(params: GenerationParams) -> int:
    """The bytes a sized generation is planned to write: its images, at most."""
    width, height = params.output_size  # a hires fix's images are larger
    file_format = params.output_format or "png"
    return params.num_images * image_file_bytes(width, height, file_format)


def training_output_check(session: Session, planned: int) -> None:
    """429 when the session owner's stored bytes and a run's `planned` output would pass
    its stored-MB quota. Call inside the transaction that creates the run."""
    if session.owner_id is None:
        return
    owner = owner_locked(session.owner_id)
    quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), planned, unit=MB)


def training_quota_reached(run: TrainingRun, step: int) -> None:
    """Stops a running training (a ServiceError: the run's error message) once its owner's
    stored bytes have passed the stored-MB quota; called each time the run has written a
    checkpoint or samples, so it ends past the quota by at most that one write. Its latest
    checkpoint (a resumed run's too) stays, to be used or continued (init_lora)."""
    owner = Owner.objects.filter(sessions__pk=run.session_id).first()
    limit = owner_quota(owner, "max_stored_mb") if owner is not None else None
    if owner is None or limit is None:
        return
    stored = owner_stored_bytes(owner.pk)
    if stored <= limit * MB:
        return
    latest = run.checkpoints.order_by("-step").first()
    kept = latest.filename if latest is not None else None
    after = (
        f"its latest checkpoint {kept} is kept: free space (DELETE a LoRA, a session or "
        "generations), then generate with it or continue it with init_lora"
        if kept
        else "it had saved no checkpoint yet"
    )
    raise ServiceError(
        f"quota exceeded: stored MB (owner {owner.name!r} may have {limit}, has "
        f"{stored / MB:.2f}): training stopped at step {step}; {after}",
        status=429,
    )
