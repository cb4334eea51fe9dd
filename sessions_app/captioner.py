"""The image-to-text model that writes captions, as this process holds it.

Captions are written in the web process, on the CPU (sdxl_engine.captioning): the model is
loaded on the first request that needs it and kept, one per process, behind a lock that
also lets one request caption at a time (two at once would only share the same cores).
Which model: SDXL_CAPTION_MODEL, else with the tiny model preset a random miniature BLIP
built once under the model cache (its captions are random words), else none (409).
"""

import threading
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

from core.errors import ServiceError
from sdxl_engine.captioning import Captioner, build_tiny_captioner, caption_images, load_captioner
from sdxl_engine.errors import EngineError
from sdxl_engine.source import planned_preset

# Under the model cache dir, beside the tiny SDXL's own folder.
TINY_CAPTIONER_FOLDER = "tiny-captioner"

_lock = threading.Lock()
_loaded: dict[str, Captioner] = {}


def captioner_model() -> str:
    """The captioning model to use: SDXL_CAPTION_MODEL (a hub id or a local folder); else,
    with the tiny model preset, the tiny random captioner's folder, built on first use.
    A 409 naming the setting when neither applies."""
    configured: str = settings.SDXL_CAPTION_MODEL.strip()
    if configured:
        return configured
    if planned_preset(settings.SDXL_MODEL_PRESET) != "tiny":
        raise ServiceError(
            "no captioning model: set SDXL_CAPTION_MODEL to a transformers image captioner "
            "(a hub id such as Salesforce/blip-image-captioning-base, or a local folder)",
            status=409,
        )
    return str(build_tiny_captioner(settings.MODEL_CACHE_DIR / TINY_CAPTIONER_FOLDER))


def captions_generate(images: Sequence[Path | bytes], prefix: str = "") -> list[str]:
    """One caption per image (a file, or an uploaded file's bytes) from the captioning
    model (captioner_model), each after `prefix`, at most SDXL_MAX_PROMPT_CHARS long.
    A model that cannot be loaded, or an image that cannot be read, is a 409; nothing is
    written here."""
    model = captioner_model()
    limit: int = settings.SDXL_MAX_PROMPT_CHARS
    with _lock:
        if model not in _loaded:
            _loaded.clear()  # a changed setting: the old model goes before the new one loads
            try:
                _loaded[model] = load_captioner(model)
            except EngineError as error:
                raise ServiceError(f"{error} (SDXL_CAPTION_MODEL)", status=409) from error
        try:
            return caption_images(_loaded[model], images, prefix, max_chars=limit)
        except EngineError as error:
            raise ServiceError(str(error), status=409) from error
