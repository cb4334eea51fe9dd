"""The worker process's loaded pipelines.

Loaded once per worker process, on first use (after django-q2 has forked the worker, so
CUDA is only ever initialised in the process that runs the jobs), and kept between jobs.
"""

import logging
import os
import threading

from django.conf import settings

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[tuple, object] = {}  # at most one entry: the model settings -> their pipelines


def worker_pipelines():
    """The Base + Refiner pipelines for the configured models; a failed load is retried."""
    from sdxl_engine.pipelines import load_pipelines
    from sdxl_engine.source import resolve_model_source

    wanted = (
        settings.SDXL_MODEL_PRESET,
        settings.SDXL_BASE_MODEL,
        settings.SDXL_REFINER_MODEL,
        str(settings.MODEL_CACHE_DIR),
        settings.SDXL_COMPILE,
    )
    with _lock:
        if wanted not in _loaded:
            _loaded.clear()  # release the old pipelines before loading others
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
            _loaded[wanted] = load_pipelines(source, compile_unets=settings.SDXL_COMPILE)
            logger.info("model: loaded %s on %s", source.preset, source.device)
        return _loaded[wanted]


def generation_pipelines():
    """worker_pipelines(), with the compiled UNets' graphs captured for the native image
    size (SDXL_COMPILE): the generation worker pays for compiling once, at its start."""
    from sdxl_engine.generation import warm_up

    pipelines = worker_pipelines()
    with _lock:
        if pipelines.compiled and not pipelines.warmed_up:
            logger.info("model: compiling the UNets for the native image size")
            warm_up(pipelines)
            logger.info("model: compiled")
    return pipelines
