"""Masks made for a session's images by a face detector or a segmentation model
(sdxl_engine.masking): POST /sessions/<id>/masks.

The work runs in the request, in the web process: face detection is a fraction of a second
per photo; a subject model runs on the web process's CPU (sdxl_engine.masking says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from PIL import Image

from access_app.callers import Caller
from core.errors import ServiceError
from sdxl_engine import masking
from sdxl_engine.errors import EngineError
from sessions_app import storage
from sessions_app.images import decode_budget
from sessions_app.links import session_image_mask_url
from sessions_app.models import TrainingImage
from sessions_app.selectors import session_get, session_images
from sessions_app.services import refuse_while_training, training_image_mask_store

logger = logging.getLogger(__name__)

MASK_KINDS = ("face", "subject")


@dataclass(frozen=True)
class ImageMasked:
    image: TrainingImage
    found: bool  # a face (or the subject) was found, and the image's mask is new
    faces: int | None  # face masks: how many faces were found


@dataclass(frozen=True)
class SessionMasks:
    kind: str
    prompt: str | None  # what a subject mask segmented
    images: list[ImageMasked]  # the images looked at, in the session's order
    skipped: int  # images left alone: they had a mask and `overwrite` was off

    @property
    def masked(self) -> int:
        return sum(result.found for result in self.images)


def session_masks_create(
    session_id: int,
    kind: str,
    overwrite: bool = False,
    prompt: str | None = None,
    caller: Caller | None = None,
) -> SessionMasks:
    """Masks every image of the session that has none (every image with `overwrite`) by
    `kind`: "face" (feathered ellipses around the faces) or "subject" (what `prompt` names,
    by default masking.DEFAULT_SUBJECT_PROMPT, through SDXL_SUBJECT_MASK_MODEL). An image
    where nothing is found keeps what it had: no mask, or its old one.

    Refused (409) while a run of the session is queued or running, and for subject masks
    when no segmentation model is configured; an API caller must see the session (404).
    Each mask is stored as it is made (training_image_mask_store, which checks the run
    again): a run started meanwhile stops the rest with its 409, the masks before it kept.
    """
    if kind not in MASK_KINDS:
        raise ServiceError(f"kind: must be one of {', '.join(MASK_KINDS)}")
    session = session_get(session_id, caller)
    refuse_while_training(session)
    model = None
    if kind == "subject":
        model = _subject_model()
        prompt = (prompt or "").strip() or masking.DEFAULT_SUBJECT_PROMPT
    else:
        prompt = None

    images = list(session_images(session.pk))
    todo = images if overwrite else [image for image in images if not image.mask_file]
    results = []
    for image in todo:
        path = storage.absolute_path(image.file)
        if not path.is_file():
            raise ServiceError(f"image {image.pk} is recorded but its file is missing", status=404)
        faces = None
        # Stored images passed the upload limits; decoding them still takes the budget.
        with Image.open(path) as opened, decode_budget(opened.width * opened.height):
            if model is None:
                found = masking.face_mask(opened)
                mask, faces = found.mask, found.faces
            else:
                mask = masking.subject_mask(model, opened, prompt or "")
        if mask is not None:
            image = training_image_mask_store(session.pk, image.pk, mask)
        results.append(ImageMasked(image=image, found=mask is not None, faces=faces))
    masks = SessionMasks(kind, prompt, results, skipped=len(images) - len(todo))
    logger.info(
        "session %s: %s masks for %d of %d images (%d skipped)",
        session.pk,
        kind,
        masks.masked,
        len(todo),
        masks.skipped,
    )
    return masks


def _subject_model() -> str:
    """The segmentation model, loaded (once per process) before any image is looked at, so
    a model that is missing or will not load is a 409 that changed nothing."""
    try:
        model = masking.subject_mask_model(
            settings.SDXL_SUBJECT_MASK_MODEL, settings.SDXL_MODEL_PRESET, settings.MODEL_CACHE_DIR
        )
        masking.load_segmenter(model)
    except EngineError as error:
        raise ServiceError(str(error), status=409) from None
    return model


def session_masks_body(masks: SessionMasks) -> dict[str, Any]:
    """The answer of POST /sessions/<id>/masks."""
    return {
        "kind": masks.kind,
        "prompt": masks.prompt,
        "images": [
            {
                "image_id": result.image.pk,
                "found": result.found,
                "faces": result.faces,
                "mask_url": session_image_mask_url(result.image) if result.found else None,
            }
            for result in masks.images
        ],
        "masked": masks.masked,
        "skipped": masks.skipped,
    }
