"""LoRA training runs: starting, cancelling, executing in the worker, recovering lost ones."""

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Value
from django.db.models.functions import Greatest
from django.utils import timezone

from access_app.callers import Caller
from core.errors import ServiceError
from sdxl_engine.errors import EngineError, TrainingCancelled
from sdxl_engine.files import sha256_file
from sdxl_engine.parameters import (
    DEFAULT_SAMPLE_PROMPTS,
    TrainingParams,
    default_training_resolution,
    fewest_steps,
    field_names,
    recipe_defaults,
    recipe_of,
    training_params,
    watch_problems,
)
from sdxl_engine.source import planned_native_side, planned_preset
from sessions_app import storage
from sessions_app.locking import session_lock
from sessions_app.models import Session
from sessions_app.selectors import session_get
from training_app import jobs
from training_app.bodies import training_event_body
from training_app.models import LoraArtifact, TrainingRun
from training_app.selectors import LORA_NOT_FOUND, lora_file_get
from training_app.services.loras import lora_file_path, lora_store, model_lora_target_shapes
from training_app.services.owner_quotas import (
    training_output_bytes,
    training_output_check,
    training_quota_reached,
    training_slot_check,
)
from training_app.services.watch import (
    checkpoint_store,
    resume_state_dir,
    resume_state_remove,
    samples_store,
)
from training_app.services.webhooks import (
    STREAM_PROGRESS_EVENTS,
    progress_crossed,
    webhook_emit,
    webhook_target_check,
)

logger = logging.getLogger(__name__)

# Progress stays below 100 until the file is stored: 100 means the LoRA exists.
_PROGRESS_BEFORE_SAVE = 99
CANCELLED_MESSAGE = "training was cancelled"
WORKER_LOST_MESSAGE = (
    "the worker running this training was lost (killed or crashed) before it finished; "
    "no LoRA was saved: train again"
)


# --- Starting a run ------------------------------------------------------------------


def training_run_start(
    session_id: int,
    parameters: dict,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    caller: Caller | None = None,
    init_lora: dict[str, Any] | None = None,
) -> TrainingRun:
    """Records a queued run and hands it to the training queue once the row is committed.
    An API `caller` must see the session, and its owner's concurrent trainings quota must
    have room (counted under the owner's lock, so two starts cannot both take the last).

    `parameters` are the TrainingParams the caller gave; the run records the whole recipe
    (sdxl_engine.parameters.training_params: the rest from the recipe, its length from
    the number of images now; on the tiny model a length left out is capped at
    TINY_RECIPE_MAX_STEPS). A name TrainingParams does not have fails here, not in the
    worker.

    `init_lora` ({"iteration": n} or {"lora_filename": name}) names a LoRA file of the
    session for the run to continue (sdxl_engine.continuation): resolved and checked
    under the session's lock, recorded on the run with its sha256, and giving the run its
    rank and train_text_encoder when `parameters` leave them out.
    """
    from sdxl_engine.dataset import find_training_pairs, mask_problem, training_captions

    if caller is not None:
        session_get(session_id, caller)
    unknown = sorted(set(parameters) - field_names(TrainingParams))
    if unknown:
        raise ServiceError(f"unknown training parameters: {', '.join(unknown)}")
    webhook_url, webhook_events = webhook_target_check(webhook_url, webhook_events)
    # A run whose worker died is queued again (it then holds the session's one active slot,
    # and this start answers 409) or, past SDXL_TRAINING_MAX_RESUMES, ended. Outside the
    # lock's transaction, which a 409 rolls back: the requeue and its enqueue must stay.
    jobs.end_lost(TRAINING_RUNS, session_id=session_id)
    with session_lock(session_id) as session:
        pairs = find_training_pairs(storage.session_dir(session.pk))
        if not pairs:
            raise ServiceError(
                f"session {session_id} has no images with captions to train on; "
                "upload some with /post_session_image first"
            )
        try:
            training_captions(pairs, parameters.get("trigger"))
        except EngineError as error:
            raise ServiceError(f"session {session_id}: {error}") from None
        problem = mask_problem(
            pairs, bool(parameters.get("masked_loss")), bool(parameters.get("use_alpha_mask"))
        )
        if problem:
            raise ServiceError(f"session {session_id}: {problem}")
        holdout = _holdout_within_images(parameters, image_count=len(pairs))
        _epochs_within_step_limit(parameters, image_count=len(pairs) - holdout)
        if TrainingRun.objects.filter(
            session=session, status__in=TrainingRun.ACTIVE_STATUSES
        ).exists():
            raise ServiceError(f"session {session_id} is already training", status=409)
        if caller is not None:
            training_slot_check(session)
        parent = None
        if init_lora is not None:
            parent, parameters = _init_lora_check(session.pk, init_lora, parameters)
        recorded = training_params(
            parameters,
            image_count=len(pairs) - holdout,
            max_steps=settings.SDXL_MAX_TRAINING_STEPS,
            tiny=planned_preset(settings.SDXL_MODEL_PRESET or None) == "tiny",
        )
        _output_within_bounds(
            session, recorded, len(pairs) - holdout, held_to_quota=caller is not None
        )
        try:
            with transaction.atomic():
                run = TrainingRun.objects.create(
                    session=session,
                    init_lora=parent,
                    parameters=asdict(recorded),
                    webhook_url=webhook_url,
                    webhook_events=webhook_events,
                )
        except IntegrityError:  # another process won the race to the partial unique index
            raise ServiceError(f"session {session_id} is already training", status=409) from None
        jobs.enqueue_new_on_commit(TRAINING_RUNS, run.pk)
    return run


def _init_lora_check(
    session_id: int, init_lora: dict[str, Any], parameters: dict
) -> tuple[dict[str, Any], dict]:
    """The record of the session's LoRA file a run continues (TrainingRun.init_lora) and
    the run's parameters with the parent's rank and train_text_encoder where they were
    left out. The file must be the one stored (its sha256), fit the model, and agree with
    the parameters given; a 400 naming the file otherwise."""
    from sdxl_engine.continuation import parent_problems, read_parent_lora

    iteration, filename = init_lora.get("iteration"), init_lora.get("lora_filename")
    try:
        lora = lora_file_get(session_id, iteration, filename)
    except ServiceError:
        named = f"LoRA {filename}" if filename is not None else f"LoRA iteration {iteration}"
        raise ServiceError(
            f"init_lora: {LORA_NOT_FOUND}: session {session_id} has no {named} "
            "(GET /sessions/<id> lists its LoRA files and checkpoints)"
        ) from None
    path = lora_file_path(lora)
    if not path.is_file():
        raise ServiceError(
            f"init_lora: {lora.filename} is recorded but missing from the session folder",
            status=409,
        )
    parent, first_error = None, None
    for shapes in model_lora_target_shapes():
        try:
            parent = read_parent_lora(path, shapes)
            break
        except EngineError as error:
            first_error = first_error or error
    if parent is None:
        raise ServiceError(f"init_lora: {first_error}")
    if parent.sha256 != lora.sha256:
        raise ServiceError(
            f"init_lora: {lora.filename} no longer holds the bytes that were stored (sha256 "
            "mismatch: altered on disk; manage.py verify tells more)",
            status=409,
        )
    given = {
        "rank": parent.rank,
        "train_text_encoder": parent.has_text_encoders,
        **parameters,
    }
    problems = parent_problems(parent, given["rank"], given["train_text_encoder"])
    if problems:
        raise ServiceError("init_lora: " + "; ".join(problems))
    record = {
        "lora_filename": lora.filename,
        "iteration": lora.number if isinstance(lora, LoraArtifact) else None,
        "sha256": lora.sha256,
    }
    return record, given


def _output_within_bounds(
    session: Session, params: TrainingParams, image_count: int, held_to_quota: bool
) -> None:
    """A 400 when checkpoint_every or sample_every would keep more files than a run may
    (parameters.watch_problems); with `held_to_quota`, a 429 when the run's planned output
    (owner_quotas.training_output_bytes) cannot fit its owner's stored-MB quota. A length
    in epochs counts at its most steps: one image a step with buckets, full batches without."""
    if params.steps:
        total_steps = params.steps
    elif params.enable_bucket:
        total_steps = (params.epochs or 1) * image_count
    else:
        total_steps = fewest_steps(params.epochs or 1, image_count, params.batch_size)
    prompts = len(params.sample_prompts or ()) or DEFAULT_SAMPLE_PROMPTS
    problems = watch_problems(params, total_steps, prompts)
    if problems:
        raise ServiceError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    if held_to_quota:
        native = planned_native_side(settings.SDXL_MODEL_PRESET or None)
        resolution = params.resolution or default_training_resolution(
            native, settings.SDXL_MAX_IMAGE_SIDE
        )
        training_output_check(
            session, training_output_bytes(params, total_steps, resolution, prompts)
        )


def _epochs_within_step_limit(parameters: dict, image_count: int) -> None:
    """Given epochs are refused, as given steps are, when they surely take more steps than
    SDXL_MAX_TRAINING_STEPS (a left-out length is capped instead: training_params)."""
    epochs = parameters.get("epochs")
    if not epochs:
        return
    batch_size = parameters.get("batch_size", recipe_defaults(recipe_of(parameters)).batch_size)
    steps = fewest_steps(epochs, image_count, batch_size)
    if steps > settings.SDXL_MAX_TRAINING_STEPS:
        raise ServiceError(
            f"epochs: {epochs} epochs of {image_count} images at batch_size {batch_size} take "
            f"at least {steps} steps, more than the limit of {settings.SDXL_MAX_TRAINING_STEPS} "
            "(SDXL_MAX_TRAINING_STEPS)"
        )


def _holdout_within_images(parameters: dict, image_count: int) -> int:
    """The photos the run withholds for its eval loss (eval_holdout): at least one must
    train. The recipe's length then follows the photos that train."""
    holdout = parameters.get("eval_holdout", 0)
    if holdout >= image_count:
        raise ServiceError(
            f"eval_holdout: {holdout} of the session's {image_count} images would leave none "
            f"to train on; at most {image_count - 1}"
        )
    return holdout


def training_run_cancel(session_id: int, caller: Caller | None = None) -> TrainingRun:
    """Ends the session's queued or running run as cancelled.

    A queued run is then never claimed; a running one notices at its next step (the
    worker's progress update finds the row no longer running) and saves nothing.
    """
    session_get(session_id, caller)
    run = TrainingRun.objects.filter(
        session_id=session_id, status__in=TrainingRun.ACTIVE_STATUSES
    ).first()
    cancelled = run is not None and jobs.finish(
        TrainingRun.objects.filter(pk=run.pk, status__in=TrainingRun.ACTIVE_STATUSES),
        TrainingRun.Status.CANCELLED,
        error_message=CANCELLED_MESSAGE,
    )
    if not cancelled:
        raise ServiceError(f"session {session_id} has no queued or running training", status=409)
    if run.status == TrainingRun.Status.QUEUED:
        # No worker holds it (a running one removes the state itself when it stops).
        resume_state_remove(session_id, run.pk)
    logger.info("training run %s of session %s cancelled", run.pk, session_id)
    run_event(run.pk, "failed")
    run.refresh_from_db()
    return run


# --- Executing a run (in the training worker) --------------------------------------------


def training_run_execute(run_id: int) -> None:
    """Runs a queued training run to its end; a run already taken is left alone."""
    if not jobs.claim(TRAINING_RUNS, run_id, stage=TrainingRun.Stage.LOADING):
        logger.info("training run %s is not queued any more; nothing to do", run_id)
        return
    run = TrainingRun.objects.get(pk=run_id)
    run_event(run_id, "started")
    output = _run_output_path(run.session_id, run.pk)
    try:
        with jobs.heartbeat(TRAINING_RUNS, [run.pk]):
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
    # The run has ended, unless it was judged lost and queued again meanwhile: then its
    # next attempt resumes from the state. (A worker killed mid-run never gets here.)
    if not TrainingRun.objects.filter(pk=run.pk, status__in=TrainingRun.ACTIVE_STATUSES).exists():
        resume_state_remove(run.session_id, run.pk)


def _run_output_path(session_id: int, run_id: int) -> Path:
    """Where a run's LoRA is written before it is stored (the engine adds `.tmp` first)."""
    return storage.session_dir(session_id) / f".training-run-{run_id}.safetensors"


def _within_image_side_limit(params: TrainingParams, base) -> TrainingParams:
    """A run that left its resolution out trains at the model's native size (1024 for
    SDXL), capped as a given resolution is: at SDXL_MAX_IMAGE_SIDE rounded down to the
    resolution's multiple of 64 (the serializer's rule). Known only here, with the model."""
    if params.resolution is not None:
        return params
    native = base.unet.config.sample_size * base.vae_scale_factor
    resolution = default_training_resolution(native, settings.SDXL_MAX_IMAGE_SIDE)
    return params if resolution == native else replace(params, resolution=resolution)


def _train_and_store(run: TrainingRun, output: Path) -> LoraArtifact:
    from sdxl_engine.dataset import find_training_pairs
    from sdxl_engine.loss_history import LossHistory
    from sdxl_engine.training import train_lora
    from training_app.runtime import worker_pipelines

    pipelines = worker_pipelines("training")
    pairs = find_training_pairs(storage.session_dir(run.session_id))
    init_lora = _init_lora_path(run) if run.init_lora else None
    params = _within_image_side_limit(TrainingParams(**run.parameters), pipelines.base)
    still_running = True
    loss_history = LossHistory()

    def on_stage(stage: str) -> None:
        nonlocal still_running
        still_running = _set_stage(run.pk, stage)

    def on_progress(step: int, total_steps: int, loss: float) -> None:
        nonlocal still_running
        percent = min(_PROGRESS_BEFORE_SAVE, step * 100 // max(total_steps, 1))
        # Saved with the step's own update, when a point of the history is complete (every
        # step early on, ever more rarely as the run grows: LossHistory).
        history = {"loss_history": loss_history.points()} if loss_history.add(step, loss) else {}
        still_running = bool(
            jobs.held_here(TRAINING_RUNS, run.pk).update(
                step=step,
                total_steps=total_steps,
                last_loss=loss,
                progress=Greatest("progress", Value(percent)),
                heartbeat_at=timezone.now(),
                **history,
            )
        )
        # None once cancelled: the stream ends with "cancelled", nothing comes after it.
        if still_running and progress_crossed(step, total_steps, STREAM_PROGRESS_EVENTS):
            run_event(run.pk, "progress", to_webhook=progress_crossed(step, total_steps))

    # After each write the run stops if its owner is now past the stored-MB quota.
    def on_checkpoint(step: int, path: Path, sha256: str) -> None:
        checkpoint_store(run, step, path, sha256)
        run_event(run.pk, "checkpoint", step=step)
        training_quota_reached(run, step)

    def on_samples(step: int, samples) -> None:
        samples_store(run, step, samples)
        run_event(run.pk, "sample", step=step)
        training_quota_reached(run, step)

    def on_resume(step: int) -> None:
        nonlocal loss_history
        # The history the lost attempt saved, up to the step this one continues from.
        loss_history = LossHistory([point for point in run.loss_history if point[0] <= step])
        jobs.held_here(TRAINING_RUNS, run.pk).update(resumed_from_step=step)

    result = train_lora(
        pipelines,
        pairs,
        params,
        output,
        on_progress=on_progress,
        # The row stops reading "running" when the run is cancelled or its session deleted;
        # each stage change and each step reads it, so a cancel lands within one step.
        should_stop=lambda: not still_running,
        on_stage=on_stage,
        low_memory={"on": True, "off": False}.get(settings.SDXL_LOW_MEMORY),
        state_dir=resume_state_dir(run.session_id, run.pk),
        on_checkpoint=on_checkpoint,
        on_samples=on_samples,
        # Shown while it runs; the engine calls it only for a state it really resumes from.
        on_resume=on_resume,
        init_lora=init_lora,
        # Only samples are scored by it: a run without any needs none.
        embedder=_similarity_embedder(pipelines) if params.sample_every != 0 else None,
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
        finished = jobs.finish(
            jobs.held_here(TRAINING_RUNS, run.pk),
            TrainingRun.Status.COMPLETED,
            stage=TrainingRun.Stage.DONE,
            resumed_from_step=result.resumed_from_step or None,
            loss_history=loss_history.points(),
            eval_loss=result.eval_loss,
            similarity=result.similarity,
            progress=100,
            heartbeat_at=timezone.now(),
        )
        if not finished:
            # Cancelled while saving: rolling back removes the row; the file goes too.
            storage.session_dir(run.session_id).joinpath(artifact.filename).unlink(missing_ok=True)
            raise TrainingCancelled(CANCELLED_MESSAGE)
    run_event(run.pk, "completed")
    return artifact


def _init_lora_path(run: TrainingRun) -> Path:
    """The file of the LoRA the run continues, still as it was when the run was asked for;
    a ServiceError (the run's error) when it was deleted or changed since."""
    recorded = run.init_lora
    assert recorded is not None  # a run with a parent
    name = recorded["lora_filename"]
    try:
        path = lora_file_path(lora_file_get(run.session_id, lora_filename=name))
    except ServiceError:
        raise ServiceError(
            f"init_lora {name} was deleted after the run was asked for; nothing was trained"
        ) from None
    if not path.is_file() or sha256_file(path) != recorded["sha256"]:
        raise ServiceError(
            f"init_lora {name} changed after the run was asked for (its sha256 differs); "
            "nothing was trained: ask again to continue the file as it is now"
        )
    return path


def _similarity_embedder(pipelines):
    """The image embedder that scores samples against the photos (SDXL_SIMILARITY_MODEL;
    on the tiny preset a tiny random one), or None; loaded for the run, released after."""
    from sdxl_engine.training.similarity import ImageEmbedder, similarity_model_source

    source = similarity_model_source(
        settings.SDXL_SIMILARITY_MODEL, pipelines.source.preset, settings.MODEL_CACHE_DIR
    )
    return ImageEmbedder(source, pipelines.device) if source is not None else None


def run_event(run_id: int, event: str, to_webhook: bool = True, **extra) -> None:
    """Records an event of the run (its event log; its webhook if its request asked for it):
    the run's /train_status answer as it is now, its ids, and `extra`."""
    run = (
        TrainingRun.objects.select_related("artifact")
        .prefetch_related("samples", "checkpoints")
        .filter(pk=run_id)
        .first()
    )
    if run is None:
        return
    webhook_emit(run, event, training_event_body(run, **extra), to_webhook)


def _set_stage(run_id: int, stage: str) -> bool:
    """Records the stage the engine entered; False when the run is no longer running."""
    now = timezone.now()
    started = {"training_started_at": now} if stage == TrainingRun.Stage.TRAINING else {}
    return bool(
        jobs.held_here(TRAINING_RUNS, run_id).update(stage=stage, heartbeat_at=now, **started)
    )


def _finish_with_error(run_id: int, message: str) -> None:
    ended = jobs.finish(
        jobs.held_here(TRAINING_RUNS, run_id), TrainingRun.Status.ERROR, error_message=message
    )
    logger.warning("training run %s ended in error: %s", run_id, message)
    if ended:
        run_event(run_id, "failed")


# --- Recovering runs whose worker died -------------------------------------------------------


def _run_lost(run: TrainingRun, still_lost) -> str | None:
    """A run whose worker died (jobs.end_lost) is queued again, to resume from its last
    checkpoint (from the start without one), at most SDXL_TRAINING_MAX_RESUMES times; after
    that it ends in error with a message saying so. Its temporary output is removed either
    way. Every worker looks for such runs at start and every few seconds, a start in its
    session, and `manage.py recover_runs` when asked."""
    if run.attempts < settings.SDXL_TRAINING_MAX_RESUMES:
        with transaction.atomic():
            handled = still_lost.update(
                status=TrainingRun.Status.QUEUED,
                stage=TrainingRun.Stage.QUEUED,
                attempts=run.attempts + 1,
                worker="",
                heartbeat_at=None,
            )
            if handled:
                jobs.enqueue_on_commit(TRAINING_RUNS, run.pk)
        outcome = "queued again to resume"
    else:
        handled = jobs.finish(
            still_lost,
            TrainingRun.Status.ERROR,
            error_message=(
                f"{WORKER_LOST_MESSAGE} (the run was resumed {run.attempts} times, the most "
                "SDXL_TRAINING_MAX_RESUMES allows)"
            ),
        )
        if handled:
            resume_state_remove(run.session_id, run.pk)
            run_event(run.pk, "failed")
        outcome = "marked as error"
    if not handled:
        return None
    output = _run_output_path(run.session_id, run.pk)
    for temporary in output.parent.glob(f"{output.name}*"):
        temporary.unlink(missing_ok=True)
    return outcome


TRAINING_RUNS = jobs.JobKind(
    model=TrainingRun,
    label="training run",
    task="training_app.tasks.train_lora_task",
    task_name="training-run",
    queue_setting="TRAINING_QUEUE",
    stale_after_setting="SDXL_RUN_STALE_AFTER",
    timeout_setting="SDXL_TRAINING_TIMEOUT",
    on_lost=_run_lost,
)
