"""A /txt2img request as the service takes it, checked against the database (its LoRAs,
the caller's quota), recorded as a Generation and enqueued for the generation worker."""

import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

from django.conf import settings
from django.db import transaction

from access_app.callers import Caller
from core.errors import ServiceError
from sdxl_engine.inpaint_images import mask_png, mask_problem
from sdxl_engine.parameters import (
    DEFAULT_LORA_SCALE,
    GenerationParams,
    LoraChoice,
    canvas_problem,
)
from sdxl_engine.source import planned_native_side
from sessions_app import storage
from sessions_app.images import check_image
from sessions_app.selectors import session_get
from training_app import jobs
from training_app.models import (
    Generation,
    GenerationLora,
    LoraArtifact,
    TrainingCheckpoint,
)
from training_app.selectors import lora_file_get, worker_alive
from training_app.services.generations.lifecycle import (
    GENERATIONS,
    INIT_IMAGE_NAME,
    MASK_IMAGE_NAME,
    NO_WORKER_MESSAGE,
    generations_dir,
)
from training_app.services.loras import lora_readable
from training_app.services.owner_quotas import (
    generation_output_bytes,
    generation_owner,
    queued_generations_check,
)
from training_app.services.webhooks import webhook_target_check


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
        assert self.session_id is not None, "the serializer requires it with use_lora"
        shorthand = LoraChoice(self.session_id, self.iteration, self.lora_filename, self.lora_scale)
        return replace(params, loras=(shorthand, *self.loras))


def generation_request(request: GenerationRequest) -> Generation:
    """Records the request and enqueues it; 503 when no generation worker is alive, 404 for
        a LoRA that is not there (or not the caller's owner's), 400 for an init_image that is
        not an image. The params themselves are the caller's to have checked (problems()); a
    width and height left out are filled here (GenerationParams.sized)."""
    if not worker_alive(settings.GENERATION_QUEUE):
        raise ServiceError(NO_WORKER_MESSAGE, status=503)
    params = request.params.filled()
    image_size = None
    if params.init_image is not None:
        checked = check_image(params.init_image, field="init_image_base64")
        image_size = (checked.width, checked.height)
    if params.mask is not None and image_size is not None:
        params = replace(params, mask=_checked_mask(params.mask, image_size))
    # A size left out: the native size of the model the worker loads (or the init_image's
    # aspect ratio at about its area), recorded so that the row and the answer tell it.
    params = params.sized(
        planned_native_side(settings.SDXL_MODEL_PRESET or None),
        max_side=settings.SDXL_MAX_IMAGE_SIDE,
        image_size=image_size,
    )
    if params.outpaint is not None:
        problem = canvas_problem(params.canvas_size, settings.SDXL_MAX_IMAGE_SIDE)
        if problem:
            raise ServiceError(f"outpaint: {problem}")
    # The hires fix's images are larger than the size it was given: the limit holds for them.
    if params.hires is not None and max(params.output_size) > settings.SDXL_MAX_IMAGE_SIDE:
        width, height = params.output_size
        raise ServiceError(
            f"hires: makes {width}x{height} images from {params.size[0]}x{params.size[1]}, "
            f"larger than SDXL_MAX_IMAGE_SIDE ({settings.SDXL_MAX_IMAGE_SIDE}): a smaller scale "
            "or size"
        )
    webhook_url, webhook_events = webhook_target_check(
        request.webhook_url, list(request.webhook_events)
    )
    loras = [
        # use_lora answers the original API's 404 message unchanged.
        (choice, _lora_of(choice, request.caller, named=not (request.use_lora and position == 0)))
        for position, choice in enumerate(params.loras)
    ]
    for _, lora in loras:
        lora_readable(lora)
    written: list[Path] = []
    try:
        with transaction.atomic():
            planned = (
                generation_output_bytes(params)
                + len(params.init_image or b"")
                + len(params.mask or b"")
            )
            owner_id = generation_owner(request.caller, planned)
            queued_generations_check(owner_id, request.caller)
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
    assert params.seed is not None, "filled() params have their seed"
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
        if params.mask is not None:
            storage.atomic_write_bytes(folder / MASK_IMAGE_NAME, params.mask)
    jobs.enqueue_new_on_commit(GENERATIONS, generation.pk)
    return generation


def _checked_mask(mask: bytes, image_size: tuple[int, int]) -> bytes:
    """The mask as it is kept (mask_png: its grey levels, which are all the engine reads);
    400 naming mask_base64 for one that is not an image (checked as uploads are), whose
    aspect ratio is not the init image's, or that has nothing white."""
    check_image(mask, field="mask_base64")
    problem = mask_problem(mask, image_size)
    if problem:
        raise ServiceError(f"mask_base64: {problem}")
    return mask_png(mask)


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
