"""What a person needs to know before the first request: GPU, models, database, broker,
workers and disk, each as one check that passes, warns or fails.

`gpu_checks` initialises CUDA: call it only in a process that will not fork workers
afterwards (the `doctor` command is its own process).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from sdxl_engine.errors import EngineError
from sdxl_engine.source import RANDOM_PRESETS, plan_model_source, weights_status
from training_app.models import WorkerHeartbeat

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 1024**3
# SDXL Base + Refiner in half precision, generating at 1024x1024; training needs more.
MIN_VRAM_GIB = 12
MIN_FREE_DISK_GIB = 10


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    name: str
    detail: str


def run_checks() -> list[Check]:
    gpu, cuda = gpu_checks()
    return [
        *gpu,
        *model_checks(cuda),
        database_check(),
        *broker_checks(),
        *worker_checks(),
        *disk_checks(),
    ]


def gpu_checks() -> tuple[list[Check], bool]:
    import torch

    if not torch.cuda.is_available():
        return [
            Check(
                WARN,
                "gpu",
                f"no CUDA GPU (torch {torch.__version__}): only the tiny model is practical; "
                "real SDXL needs an NVIDIA GPU and the CUDA build of torch",
            )
        ], False
    checks = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        status = OK if total / GIB >= MIN_VRAM_GIB else WARN
        checks.append(
            Check(
                status,
                f"gpu {index}",
                f"{properties.name}: {total / GIB:.1f} GiB VRAM, {free / GIB:.1f} GiB free"
                + ("" if status == OK else f" (SDXL wants {MIN_VRAM_GIB} GiB or more)"),
            )
        )
    return checks, True


def model_checks(cuda: bool) -> list[Check]:
    try:
        source = plan_model_source(
            settings.SDXL_MODEL_PRESET or None,
            settings.SDXL_BASE_MODEL,
            settings.SDXL_REFINER_MODEL,
            settings.MODEL_CACHE_DIR,
            cuda=cuda,
        )
    except EngineError as error:
        return [Check(FAIL, "models", str(error))]
    checks = [Check(OK, "models", source.reason)]
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    for role, model, variable in (
        ("base", source.base, "SDXL_BASE_MODEL"),
        ("refiner", source.refiner, "SDXL_REFINER_MODEL"),
    ):
        status = weights_status(model)
        if status.present:
            checks.append(Check(OK, f"{role} weights", f"present: {status.where}"))
        elif source.preset in RANDOM_PRESETS:
            checks.append(
                Check(
                    OK,
                    f"{role} weights",
                    f"not built yet: built at {model} on first use, or now with "
                    f"`manage.py build_model --preset {source.preset}`",
                )
            )
        elif Path(model).is_absolute() or offline:
            checks.append(
                Check(
                    FAIL,
                    f"{role} weights",
                    f"missing: {model} cannot load without a download"
                    + (" (HF_HUB_OFFLINE is set)" if offline else "")
                    + f"; download it or set {variable} to a diffusers folder",
                )
            )
        else:
            checks.append(
                Check(
                    WARN,
                    f"{role} weights",
                    f"not in the Hugging Face cache ({status.where}): {model} downloads on "
                    f"first use; `huggingface-cli download {model}` fetches it beforehand",
                )
            )
    return checks


def database_check() -> Check:
    database = settings.DATABASES["default"]
    name = f"{connection.vendor} {database.get('NAME')}"
    try:
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as error:
        return Check(FAIL, "database", f"{name} is not reachable: {error}")
    if pending:
        return Check(
            WARN,
            "database",
            f"{name}: {len(pending)} migrations not applied; `manage.py migrate` (or serve) "
            "applies them",
        )
    return Check(OK, "database", f"{name}: reachable, migrations applied")


def broker_checks() -> list[Check]:
    """Each queue's broker answers; the jobs waiting are the database's queued rows, the
    truth (a broker's queue size misses a task a worker took out while its job runs)."""
    from django_q.brokers import get_broker

    from training_app.queue_selectors import jobs_waiting

    try:
        waiting = jobs_waiting()
    except DatabaseError:
        waiting = {}
    checks = []
    for kind, queue in (
        ("training", settings.TRAINING_QUEUE),
        ("generation", settings.GENERATION_QUEUE),
    ):
        try:
            broker = get_broker(queue)
            broker.ping()
        except Exception as error:  # any broker failure (Redis down, bad URL) is the answer
            checks.append(Check(FAIL, f"broker {queue}", f"not reachable: {error}"))
        else:
            count = waiting.get(kind)
            checks.append(
                Check(
                    OK,
                    f"broker {queue}",
                    f"{broker.info()}: reachable, "
                    + (
                        f"jobs waiting: {count} {kind}"
                        if count is not None
                        else "jobs waiting unknown (the database is not reachable)"
                    ),
                )
            )
    return checks


def worker_checks() -> list[Check]:
    fresh_since = timezone.now() - timedelta(seconds=settings.SDXL_WORKER_STALE_AFTER)
    checks = []
    for kind, queue in (
        ("training", settings.TRAINING_QUEUE),
        ("generation", settings.GENERATION_QUEUE),
    ):
        try:
            alive = [
                f"{worker.host}:{worker.pid}"
                for worker in WorkerHeartbeat.objects.filter(
                    queue=queue, last_seen__gte=fresh_since
                )
            ]
        except DatabaseError:
            checks.append(Check(FAIL, f"{kind} workers", "unknown: the database is not reachable"))
            continue
        if alive:
            checks.append(Check(OK, f"{kind} workers", f"{len(alive)} alive: {', '.join(alive)}"))
        else:
            checks.append(
                Check(
                    WARN,
                    f"{kind} workers",
                    f"none alive on {queue}; start `manage.py serve` "
                    f"(or `manage.py worker {kind}`)",
                )
            )
    return checks


def disk_checks() -> list[Check]:
    checks = []
    for name, folder in (
        ("data dir", settings.DATA_DIR),
        ("model cache", settings.MODEL_CACHE_DIR),
    ):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None:
            continue
        free = shutil.disk_usage(existing).free / GIB
        status = OK if free >= MIN_FREE_DISK_GIB else (WARN if free >= 1 else FAIL)
        checks.append(Check(status, name, f"{folder}: {free:.1f} GiB free"))
    return checks
