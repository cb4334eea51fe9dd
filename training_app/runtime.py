"""The worker process's loaded pipelines.

Loaded once per worker process, on first use (after django-q2 has forked the worker, so
CUDA is only ever initialised in the process that runs the jobs), and kept between jobs.
"""

import logging
import os
import threading
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from sdxl_engine.generation.pipelines import Pipelines, Purpose

logger = logging.getLogger(__name__)

_lock = threading.Lock()
# The model settings and purpose -> their pipelines: one entry per purpose at most.
_loaded: "dict[tuple[tuple[object, ...], Purpose], Pipelines]" = {}


def worker_pipelines(purpose: "Purpose") -> "Pipelines":
    """The pipelines for the configured models and `purpose` (sdxl_engine.generation.pipelines:
    "generation" loads Base + Refiner in float16, "training" the Base alone in bfloat16);
    a failed load is retried.

    Each worker serves one queue, so it holds one set; a process that serves both (tests,
    synchronous runs) holds both.
    """
    from sdxl_engine.generation import load_pipelines, resolve_model_source

    models = (
        settings.SDXL_MODEL_PRESET,
        settings.SDXL_BASE_MODEL,
        settings.SDXL_REFINER_MODEL,
        str(settings.MODEL_CACHE_DIR),
        settings.SDXL_COMPILE,
        settings.SDXL_CUDA_GRAPHS,
    )
    with _lock:
        if (models, purpose) not in _loaded:
            # Release pipelines of other model settings before loading these.
            for key in [key for key in _loaded if key[0] != models]:
                del _loaded[key]
            source = resolve_model_source(
                settings.SDXL_MODEL_PRESET or None,
                settings.SDXL_BASE_MODEL,
                settings.SDXL_REFINER_MODEL,
                settings.MODEL_CACHE_DIR,
            )
            logger.info("model: %s", source.reason)
            if settings.SDXL_COMPILE:
                # Compiled kernels are kept with the models (not in /tmp), so a restarted
                # worker compiles in about a minute instead of four.
                os.environ.setdefault(
                    "TORCHINDUCTOR_CACHE_DIR", str(settings.MODEL_CACHE_DIR / "torch-compile")
                )
            _loaded[models, purpose] = load_pipelines(
                source,
                purpose=purpose,
                compile_unets=settings.SDXL_COMPILE,
                cuda_graphs=settings.SDXL_CUDA_GRAPHS,
            )
            logger.info("model: loaded %s on %s for %s", source.preset, source.device, purpose)
        return _loaded[models, purpose]


def generation_pipelines() -> "Pipelines":
    """The generation pipelines, with the compiled UNets' graphs captured for the native
    image size (SDXL_COMPILE): the generation worker pays for compiling once, at its start."""
    from sdxl_engine.generation import warm_up

    pipelines = worker_pipelines("generation")
    with _lock:
        if pipelines.compiled and not pipelines.warmed_up:
            logger.info("model: compiling the UNets for the native image size")
            warm_up(pipelines)
            logger.info("model: compiled")
    return pipelines
