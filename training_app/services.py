"""LoRA training runs and LoRA files: starting, executing, storing, uploading."""

import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Value
from django.db.models.functions import Greatest
from django.utils import timezone

from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.files import replace_with_retry, sha256_file
from sdxl_service.errors import ServiceError
from sessions_app import storage
from sessions_app.locking import session_lock
from sessions_app.selectors import session_get
from training_app.models import Generation, LoraArtifact, TrainingRun
from training_app.queueing import enqueue, redeliver_lost

logger = logging.getLogger(__name__)

# A stored LoRA name: a plain file name in the session folder, nothing that could climb out.
_LORA_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.safetensors$")
# What /get_lora can send: the stored (diffusers) form, or kohya's for other tools.
LORA_FORMATS = ("diffusers", "kohya")
# Progress stays below 100 until the file is stored: 100 means the LoRA exists.
_PROGRESS_BEFORE_SAVE = 99
CANCELLED_MESSAGE = "training was cancelled"
# The job's heartbeat thread writes this many times per SDXL_RUN_STALE_AFTER.
_BEATS_PER_STALE_PERIOD = 4
WORKER_LOST_MESSAGE = (
    "the worker running this training was lost (killed or crashed) before it finished; "
    "no LoRA was saved: train again"
)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- Starting a run ------------------------------------------------------------------


def training_run_start(session_id: int, parameters: dict) -> TrainingRun:
    """Records a queued run and hands it to the training queue once the row is committed."""
    from sdxl_engine.dataset import find_training_pairs

    with session_lock(session_id) as session:
        # A run whose worker died must not hold the session's one active slot.
        training_runs_recover_lost(session_id)
        if not find_training_pairs(storage.session_dir(session.pk)):
            raise ServiceError(
                f"session {session_id} has no images with captions to train on; "
                "upload some with /post_session_image first"
            )
        if TrainingRun.objects.filter(
            session=session, status__in=TrainingRun.ACTIVE_STATUSES
        ).exists():
            raise ServiceError(f"session {session_id} is already training", status=409)
        try:
            with transaction.atomic():
                run = TrainingRun.objects.create(session=session, parameters=parameters)
        except IntegrityError:  # another process won the race to the partial unique index
            raise ServiceError(f"session {session_id} is already training", status=409) from None
        transaction.on_commit(lambda: _enqueue_run(run.pk))
    return run


def _enqueue_run(run_id: int) -> None:
    enqueue(
        "training_app.tasks.train_lora_task",
        TrainingRun,
        run_id,
        settings.TRAINING_QUEUE,
        f"training-run-{run_id}",
    )


def training_run_cancel(session_id: int) -> TrainingRun:
    """Ends the session's queued or running run as cancelled.

    A queued run is then never claimed; a running one notices at its next step (the
    worker's progress update finds the row no longer running) and saves nothing.
    """
    session_get(session_id)
    run = TrainingRun.objects.filter(
        session_id=session_id, status__in=TrainingRun.ACTIVE_STATUSES
    ).first()
    cancelled = run is not None and TrainingRun.objects.filter(
        pk=run.pk, status__in=TrainingRun.ACTIVE_STATUSES
    ).update(
        status=TrainingRun.Status.ERROR,
        error_message=CANCELLED_MESSAGE,
        finished_at=timezone.now(),
    )
    if not cancelled:
        raise ServiceError(f"session {session_id} has no queued or running training", status=409)
    logger.info("training run %s of session %s cancelled", run.pk, session_id)
    run.refresh_from_db()
    return run


# --- Executing a run (in the training worker) --------------------------------------------


def training_run_execute(run_id: int) -> None:
    """Runs a queued training run to its end; a run already taken is left alone."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING,
        stage=TrainingRun.Stage.LOADING,
        started_at=now,
        heartbeat_at=now,
        worker=worker_identity(),
    )
    if not claimed:
        logger.info("training run %s is not queued any more; nothing to do", run_id)
        return
    run = TrainingRun.objects.get(pk=run_id)
    output = _run_output_path(run.session_id, run.pk)
    try:
        with _heartbeat(run.pk):
            artifact = _train_and_store(run, output)
    except TrainingCancelled:
        _finish_with_error(run_id, CANCELLED_MESSAGE)
    except EngineError as error:
        _finish_with_error(run_id, str(error))
    except ServiceError as error:
        _finish_with_error(run_id, error.message)
    except Exception as error:
        logger.exception("training run %s failed", run_id)
        _finish_with_error(run_id, f"training failed: {type(error).__name__}: {error}")
    else:
        logger.info("training run %s stored %s", run_id, artifact.filename)
    finally:
        output.unlink(missing_ok=True)


def _run_output_path(session_id: int, run_id: int) -> Path:
    """Where a run's LoRA is written before it is stored (the engine adds `.tmp` first)."""
    return storage.session_dir(session_id) / f".training-run-{run_id}.safetensors"


@contextmanager
def _heartbeat(run_id: int) -> Iterator[None]:
    """Keeps the run's `heartbeat_at` fresh from a thread for as long as the block runs.

    Progress callbacks come only between training steps, and loading a model (or one step
    of a large one) can take minutes; the thread beats regardless, so a heartbeat goes
    stale only when the worker process is gone.
    """
    stopped = threading.Event()
    interval = settings.SDXL_RUN_STALE_AFTER / _BEATS_PER_STALE_PERIOD

    def beat() -> None:
        try:
            while not stopped.wait(interval):
                try:
                    TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(
                        heartbeat_at=timezone.now()
                    )
                except DatabaseError:
                    logger.exception("could not write the heartbeat of training run %s", run_id)
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=beat, name=f"training-run-{run_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


def _train_and_store(run: TrainingRun, output: Path) -> LoraArtifact:
    from sdxl_engine.dataset import find_training_pairs
    from sdxl_engine.training import TrainingParams, train_lora
    from training_app.runtime import worker_pipelines

    pipelines = worker_pipelines("training")
    pairs = find_training_pairs(storage.session_dir(run.session_id))
    still_running = True

    def on_stage(stage: str) -> None:
        nonlocal still_running
        still_running = _set_stage(run.pk, stage)

    def on_progress(step: int, total_steps: int, loss: float) -> None:
        nonlocal still_running
        percent = min(_PROGRESS_BEFORE_SAVE, step * 100 // max(total_steps, 1))
        still_running = bool(
            TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
                step=step,
                total_steps=total_steps,
                last_loss=loss,
                progress=Greatest("progress", Value(percent)),
                heartbeat_at=timezone.now(),
            )
        )

    result = train_lora(
        pipelines,
        pairs,
        TrainingParams(**run.parameters),
        output,
        on_progress=on_progress,
        # The row stops reading "running" when the run is cancelled or its session deleted;
        # each stage change and each step reads it, so a cancel lands within one step.
        should_stop=lambda: not still_running,
        on_stage=on_stage,
        low_memory={"on": True, "off": False}.get(settings.SDXL_LOW_MEMORY),
    )
    with transaction.atomic():
        artifact = lora_store(
            run.session_id,
            output,
            expected_sha256=result.sha256,
            source=LoraArtifact.Source.TRAINED,
            training_run=run,
            metadata=result.metadata,
        )
        finished = TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.RUNNING).update(
            status=TrainingRun.Status.COMPLETED,
            stage=TrainingRun.Stage.DONE,
            progress=100,
            finished_at=timezone.now(),
            heartbeat_at=timezone.now(),
        )
        if not finished:
            # Cancelled while saving: rolling back removes the row; the file goes too.
            storage.session_dir(run.session_id).joinpath(artifact.filename).unlink(missing_ok=True)
            raise TrainingCancelled(CANCELLED_MESSAGE)
    return artifact


def _set_stage(run_id: int, stage: str) -> bool:
    """Records the stage the engine entered; False when the run is no longer running."""
    now = timezone.now()
    started = {"training_started_at": now} if stage == TrainingRun.Stage.TRAINING else {}
    return bool(
        TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(
            stage=stage, heartbeat_at=now, **started
        )
    )


def _finish_with_error(run_id: int, message: str) -> None:
    TrainingRun.objects.filter(pk=run_id, status__in=TrainingRun.ACTIVE_STATUSES).update(
        status=TrainingRun.Status.ERROR,
        error_message=message,
        finished_at=timezone.now(),
    )
    logger.warning("training run %s ended in error: %s", run_id, message)


# --- Recovering runs whose worker died -------------------------------------------------------


def training_runs_recover_lost(session_id: int | None = None) -> list[int]:
    """Ends running runs whose heartbeat is older than SDXL_RUN_STALE_AFTER: their worker
    died (kill -9, out of memory, machine gone). Each reads `error` with a message saying
    so, and its temporary files are removed. Returns the ids of the runs it ended.

    Workers call it at start and every few seconds; `manage.py recover_runs` too.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.SDXL_RUN_STALE_AFTER)
    stale = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff)
    if session_id is not None:
        stale = stale.filter(session_id=session_id)
    recovered = []
    for run_id, run_session_id in stale.values_list("pk", "session_id"):
        # Conditional, like every status change: a run whose worker beat meanwhile stays.
        ended = stale.filter(pk=run_id).update(
            status=TrainingRun.Status.ERROR,
            error_message=WORKER_LOST_MESSAGE,
            finished_at=timezone.now(),
        )
        if ended:
            output = _run_output_path(run_session_id, run_id)
            for temporary in output.parent.glob(f"{output.name}*"):
                temporary.unlink(missing_ok=True)
            recovered.append(run_id)
            logger.warning("training run %s lost its worker; marked as error", run_id)
    return recovered


def training_runs_redeliver() -> list[int]:
    """Hands queued runs whose task was lost back to the training queue (see
    queueing.redeliver_lost); returns their ids. Training workers call it every few
    seconds, so a run never stays queued, holding its session's one slot, for nothing."""
    return redeliver_lost(
        TrainingRun,
        settings.TRAINING_QUEUE,
        _enqueue_run,
        waited_s=settings.SDXL_RUN_STALE_AFTER,
        job_timeout_s=settings.SDXL_TRAINING_TIMEOUT,
    )


# --- Storing LoRA files -------------------------------------------------------------------


def _allocate_lora_name(session, requested: str | None) -> tuple[int, str]:
    """The next iteration number (never reused) and the file name to store under."""
    folder = storage.session_dir(session.pk)
    taken = set(LoraArtifact.objects.filter(session=session).values_list("filename", flat=True))
    number = session.next_lora_number
    if requested is not None:
        if requested in taken or (folder / requested).exists():
            raise ServiceError(
                f"a LoRA named {requested} already exists in session {session.pk}", status=409
            )
        return number, requested
    # Files an operator dropped in by hand keep their names: skip past them.
    while f"lora_{number}.safetensors" in taken or (folder / f"lora_{number}.safetensors").exists():
        number += 1
    return number, f"lora_{number}.safetensors"


def lora_store(
    session_id: int,
    finished_file: Path,
    *,
    expected_sha256: str,
    source: str,
    filename: str | None = None,
    training_run: TrainingRun | None = None,
    metadata: dict | None = None,
) -> LoraArtifact:
    """Moves a complete, fsynced LoRA file into the session folder and records it.

    Under the session lock the file is renamed into place (a fresh name: no LoRA is ever
    overwritten), then hashed: only a file whose sha256 is `expected_sha256`, the hash of
    the bytes its writer meant to write, gets its row, in the same transaction. Any
    failure removes the file, so no row ever names a missing or truncated LoRA.
    """
    with session_lock(session_id) as session:
        number, name = _allocate_lora_name(session, filename)
        folder = storage.session_dir(session.pk)
        folder.mkdir(parents=True, exist_ok=True)  # under the lock: the session still exists
        target = folder / name
        try:
            replace_with_retry(finished_file, target)
        except OSError as error:
            raise ServiceError(
                f"the LoRA could not be moved into place ({error.strerror or error}); "
                "nothing was stored",
                status=500,
            ) from None
        try:
            sha256 = sha256_file(target)
            if sha256 != expected_sha256:
                raise ServiceError(
                    f"{name} does not hold the bytes that were written (sha256 mismatch: "
                    "truncated or altered on disk); nothing was stored",
                    status=500,
                )
            artifact = LoraArtifact.objects.create(
                session=session,
                number=number,
                filename=name,
                size=target.stat().st_size,
                sha256=sha256,
                source=source,
                training_run=training_run,
                metadata=metadata or {},
            )
            session.next_lora_number = number + 1
            session.save(update_fields=["next_lora_number"])
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    return artifact


def lora_upload(session_id: int, data: bytes, filename: str | None) -> LoraArtifact:
    """Stores an uploaded LoRA in the canonical (diffusers) form the trainer writes, after
    checking it is an SDXL UNet LoRA for the model.

    diffusers, PEFT and kohya files are accepted; one already canonical is stored byte for
    byte, any other is converted (alphas folded into the weights, so it computes the same).
    The bytes are read as safetensors (a header and raw numbers), never unpickled. They
    are staged outside the session folder, so a session deleted meanwhile gets no file.
    """
    from sdxl_engine.lora_files import inspect_lora_file, read_lora_metadata
    from sdxl_engine.lora_formats import canonical_lora_file, is_canonical

    if filename is not None and not _LORA_FILENAME.fullmatch(filename):
        raise ServiceError(
            "filename must be a plain file name ending in .safetensors "
            "(letters, digits, '.', '_' and '-')"
        )
    session = session_get(session_id)
    upload = storage.staging_path("upload.safetensors")
    converted = storage.staging_path("converted.safetensors")
    try:
        storage.atomic_write_bytes(upload, data)
        try:
            inspect_lora_file(upload)
            if is_canonical(upload):
                finished, metadata = upload, read_lora_metadata(upload)
            else:
                finished, metadata = converted, canonical_lora_file(upload, converted)
            _check_lora_fits_the_model(finished)
        except EngineError as error:
            raise ServiceError(f"lora_base64 is not a usable LoRA file: {error}") from None
        return lora_store(
            session.pk,
            finished,
            # What must land in the session folder: the bytes sent, or our conversion.
            expected_sha256=(
                storage.sha256_bytes(data) if finished == upload else sha256_file(finished)
            ),
            source=LoraArtifact.Source.UPLOADED,
            filename=filename,
            metadata=metadata,
        )
    finally:
        upload.unlink(missing_ok=True)
        converted.unlink(missing_ok=True)


def _check_lora_fits_the_model(path: Path) -> None:
    """Checks the file against each UNet the configured model may be (it fits if it fits
    one); against the LoRA's own consistency only when the web process cannot know it."""
    from sdxl_engine.lora_files import check_unet_lora, unet_lora_target_shapes
    from sdxl_engine.source import base_unet_configs

    shape_sets = []
    for config in base_unet_configs(settings.SDXL_MODEL_PRESET, settings.SDXL_BASE_MODEL):
        try:
            shape_sets.append(unet_lora_target_shapes(config))
        except EngineError:
            shape_sets.append(None)  # a UNet unlike SDXL's: check consistency only
    first_error = None
    for shapes in shape_sets or [None]:
        try:
            check_unet_lora(path, shapes)
            return
        except EngineError as error:
            first_error = first_error or error
    raise first_error


def lora_read(artifact: LoraArtifact, lora_format: str = LORA_FORMATS[0]) -> bytes:
    """The file's bytes, or with `lora_format="kohya"` the same adapter in kohya's form.

    Either way the file is read whole in one go: a concurrent replace swaps the name, not
    these bytes.
    """
    path = storage.session_dir(artifact.session_id) / artifact.filename
    missing = ServiceError(
        f"{artifact.filename} is recorded but missing from the session folder", status=404
    )
    if not path.is_file():
        raise missing
    if lora_format == "kohya":
        from sdxl_engine.lora_formats import kohya_lora_bytes

        try:
            return kohya_lora_bytes(path, base_model=settings.SDXL_BASE_MODEL)
        except EngineError as error:
            raise ServiceError(
                f"{artifact.filename} cannot be converted to kohya format: {error}", status=409
            ) from None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise missing from None


def loras_prune(keep: int, dry_run: bool = False, session_id: int | None = None) -> list[str]:
    """Deletes all but the newest `keep` LoRA files of each session (or of one session).

    Numbers are never reused: the session's counter stays where it is. A LoRA that a
    queued or running generation is about to use is kept. Returns the files deleted (or,
    with `dry_run`, that would be), as `session_<id>/<file>`.
    """
    sessions = LoraArtifact.objects.values_list("session_id", flat=True).distinct()
    if session_id is not None:
        sessions = sessions.filter(session_id=session_id)
    in_use = set(
        Generation.objects.filter(
            status__in=[Generation.Status.QUEUED, Generation.Status.RUNNING], lora__isnull=False
        ).values_list("lora_id", flat=True)
    )
    pruned = []
    for sid in sorted(set(sessions)):
        with session_lock(sid):
            doomed = [
                (pk, name)
                for pk, name in LoraArtifact.objects.filter(session_id=sid)
                .order_by("-number")[keep:]
                .values_list("pk", "filename")
                if pk not in in_use
            ]
            pruned += [f"session_{sid}/{name}" for _, name in doomed]
            if dry_run or not doomed:
                continue
            LoraArtifact.objects.filter(pk__in=[pk for pk, _ in doomed]).delete()
            # The rows go first, the files once that is committed: a failure keeps both.
            paths = [storage.session_dir(sid) / name for _, name in doomed]
            transaction.on_commit(lambda paths=paths: _unlink_all(paths))
    return pruned


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
