"""Every JSON shape of runs, LoRA files and generations that an answer and a webhook event
share, built in this one module from the rows the selectors read: a training status (the
five shapes of /train_status, which /list_sessions and the training events carry), a
generation's status (GET /generations/<id> and its events), what a generation used
(/txt2img's answer) and a session's detail. The API renders them through its response
serializers; the webhooks post them as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings

from sdxl_engine.parameters import (
    TrainingParams,
    checkpoint_steps,
    default_training_resolution,
    image_seeds,
    sample_steps,
)
from sdxl_engine.prompt_syntax import DEFAULT_PROMPT_SYNTAX
from sdxl_engine.source import planned_native_side, planned_preset
from sessions_app.links import session_image_mask_url, session_image_url
from sessions_app.models import TrainingImage
from training_app import links
from training_app.models import Generation, TrainingRun
from training_app.queue_selectors import (
    NOT_QUEUED,
    generation_queue_places,
    training_queue_places,
)
from training_app.selectors import SessionDetail, latest_runs, run_eta_seconds

if TYPE_CHECKING:
    from sessions_app.selectors import SessionWithGroups

# A generation in these states says why (its message); in the others, message is null.
_WITH_MESSAGE = (Generation.Status.ERROR, Generation.Status.CANCELLED)


def training_status(session_id: int) -> dict[str, Any]:
    """/train_status: the status of the session's latest run."""
    return training_status_body(latest_runs([session_id]).get(session_id))


def training_status_body(run: TrainingRun | None) -> dict[str, Any]:
    """The /train_status answer (docs/api.md's five shapes) plus extra keys about the run."""
    if run is None:
        return {"status": "none", "progress": 0}
    if run.status in (TrainingRun.Status.ERROR, TrainingRun.Status.CANCELLED):
        return {"status": str(run.status), "message": run.error_message}
    if run.status == TrainingRun.Status.COMPLETED:
        artifact = getattr(run, "artifact", None)
        return {
            "status": "completed",
            "progress": 100,
            "lora": artifact.filename if artifact else None,
            "init_lora": run.init_lora,
            **_kept_along_the_way(run),
        }
    return {
        "status": "in-progress",
        "progress": run.progress,
        "queued": run.status == TrainingRun.Status.QUEUED,
        "stage": run.stage,
        "step": run.step,
        "total_steps": run.total_steps,
        "loss": run.last_loss,
        "eta_seconds": run_eta_seconds(run),
        "init_lora": run.init_lora,
        **training_queue_body(run),
        **_kept_along_the_way(run),
    }


def training_queue_body(run: TrainingRun) -> dict[str, Any]:
    """A run's place in the training queue: queue_position (1: next), waiting_for (the job
    ahead) and queue_eta_seconds (until a worker takes it); all null once it is not queued."""
    place = training_queue_places([run]).get(run.pk)
    return place.as_dict() if place else dict(NOT_QUEUED)


def generation_queue_body(generation: Generation) -> dict[str, Any]:
    """A generation's place in the generation queue, as training_queue_body says for a run."""
    place = generation_queue_places([generation]).get(generation.pk)
    return place.as_dict() if place else dict(NOT_QUEUED)


def training_started_body(run: TrainingRun) -> dict[str, Any]:
    """/train_lora's answer: the run's id and the recipe it will train."""
    return {"status": "started", "run_id": run.pk, "recipe": training_recipe_body(run)}


def training_recipe_body(run: TrainingRun) -> dict[str, Any]:
    """What the run trains (its recorded TrainingParams, resolved): the recipe's name, the
    model it was planned for, length, batch, rank, rate, resolution, buckets, masks, and the
    steps it samples and keeps checkpoints at. A length in epochs has its steps (and so its sample
    and checkpoint steps) known only once the worker has sorted the images into buckets:
    null until then (/train_status's total_steps tells them; GET /sessions/<id> lists every
    run's recorded parameters)."""
    params = TrainingParams(**run.parameters)
    steps = params.steps or run.total_steps
    preset = planned_preset(settings.SDXL_MODEL_PRESET or None)
    native = default_training_resolution(planned_native_side(preset), settings.SDXL_MAX_IMAGE_SIDE)
    return {
        "name": params.recipe,
        "model": preset,
        "steps": steps,
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        "rank": params.rank,
        "learning_rate": params.learning_rate,
        "lr_scheduler": params.lr_scheduler,
        "lr_warmup_steps": params.lr_warmup_steps,
        "resolution": params.resolution or native,
        "enable_bucket": params.enable_bucket,
        "train_text_encoder": params.train_text_encoder,
        "masked_loss": params.loss_masked,
        "background_weight": params.background_weight,
        "use_alpha_mask": params.use_alpha_mask,
        "prior_preservation_weight": params.prior_preservation_weight,
        "class_prompt": params.class_prompt,
        "sample_steps": sample_steps(params.sample_every, steps) if steps else None,
        "checkpoint_steps": checkpoint_steps(params.checkpoint_every, steps) if steps else None,
        "init_lora": run.init_lora,
    }


def _kept_along_the_way(run: TrainingRun) -> dict[str, Any]:
    """The run's sample images, checkpoints (the final LoRA last once completed) with their
    scores and the best of them, its loss history, and the step it resumed from."""
    checkpoints = [
        {
            "step": checkpoint.step,
            "lora_filename": checkpoint.filename,
            "eval_loss": checkpoint.eval_loss,
            "similarity": checkpoint.similarity,
        }
        for checkpoint in run.checkpoints.all()
    ]
    artifact = getattr(run, "artifact", None)
    if run.status == TrainingRun.Status.COMPLETED and artifact is not None:
        checkpoints.append(
            {
                "step": run.total_steps or run.step,
                "lora_filename": artifact.filename,
                "eval_loss": run.eval_loss,
                "similarity": run.similarity,
            }
        )
    return {
        "samples": [
            {
                "step": sample.step,
                "prompt": sample.prompt,
                "url": links.training_sample_url(sample),
            }
            for sample in run.samples.all()
        ],
        "checkpoints": checkpoints,
        "best_checkpoint": best_checkpoint(checkpoints),
        "loss_history": [{"step": step, "loss": loss} for step, loss in run.loss_history],
        "resumed_from_step": run.resumed_from_step,
    }


def best_checkpoint(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The checkpoint (the final LoRA among them) of the lowest eval loss, the earlier step
    on a tie; None while none is scored."""
    scored = [checkpoint for checkpoint in checkpoints if checkpoint["eval_loss"] is not None]
    if not scored:
        return None
    best = min(scored, key=lambda checkpoint: (checkpoint["eval_loss"], checkpoint["step"]))
    return {key: best[key] for key in ("step", "lora_filename", "eval_loss")}


def training_event_body(run: TrainingRun, **extra: object) -> dict[str, Any]:
    """A training webhook event's data: the run's status as /train_status answers it."""
    return {"run_id": run.pk, "session_id": run.session_id, **training_status_body(run), **extra}


def session_summary(
    session: SessionWithGroups, latest_lora: str | None, run: TrainingRun | None
) -> dict[str, Any]:
    """One session as /list_sessions lists it."""
    return {
        "session_id": session.pk,
        "latest_lora": latest_lora,
        "image_groups": session.group_count,
        "training": training_status_body(run),
    }


def session_detail_body(detail: SessionDetail) -> dict[str, Any]:
    """GET /sessions/<id>: the session's images, LoRA files, runs and recent generations."""
    places = training_queue_places(detail.runs)
    return {
        "session_id": detail.session.pk,
        "created_at": detail.session.created_at,
        "images": [session_image_item(image) for image in detail.images],
        "loras": [
            {
                "lora_filename": lora.filename,
                "iteration": lora.number,
                "sha256": lora.sha256,
                "size": lora.size,
                "source": lora.source,
                "run_id": lora.training_run_id,
                "created_at": lora.created_at,
            }
            for lora in detail.loras
        ],
        "checkpoints": [
            {
                "lora_filename": checkpoint.filename,
                "run_id": checkpoint.run_id,
                "step": checkpoint.step,
                "sha256": checkpoint.sha256,
            }
            for checkpoint in detail.checkpoints
        ],
        "runs": [
            {
                "run_id": run.pk,
                "status": run.status,
                "stage": run.stage,
                "step": run.step,
                "total_steps": run.total_steps,
                "parameters": run.parameters,
                "init_lora": run.init_lora,
                "message": run.error_message or None,
                "created_at": run.created_at,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                **(places[run.pk].as_dict() if run.pk in places else NOT_QUEUED),
            }
            for run in detail.runs
        ],
        "recent_generations": [
            {
                "generation_id": generation.pk,
                "status": generation.status,
                "prompt": generation.prompt,
                "created_at": generation.created_at,
                "status_url": links.generation_url(generation),
            }
            for generation in detail.recent_generations
        ],
    }


def session_image_item(image: TrainingImage) -> dict[str, Any]:
    """A training image as the API lists it (GET /sessions/<id>, uploads' answers)."""
    return {
        "image_id": image.pk,
        "group": image.group.number,
        "url": session_image_url(image),
        "caption": image.caption,
        "format": image.image_format,
        "width": image.width,
        "height": image.height,
        "size": image.size,
        "mask_url": session_image_mask_url(image) if image.mask_file else None,
    }


def generation_summary(generation: Generation) -> dict[str, Any]:
    """What a finished generation used, as /txt2img answers it beside the images."""
    params = generation.params
    loras = [
        {
            "session_id": str(lora.source_session_id),
            "filename": lora.filename,
            "sha256": lora.sha256,
            "scale": lora.scale,
        }
        for lora in generation.applied_loras.all()
    ]
    return {
        "seed": generation.seed,
        "seeds": image_seeds(generation.seed, generation.image_count),
        "lora": {key: loras[0][key] for key in ("filename", "sha256")} if loras else None,
        "loras": loras,
        "scheduler": params.scheduler,
        "refiner": params.refiner_policy,
        "refiner_switch": params.refiner_switch_at,
        "strength": params.strength,
        "output_format": params.file_format,
        # --- prompts (issue 28)
        "prompt_syntax": params.prompt_syntax or DEFAULT_PROMPT_SYNTAX,
        "duration_ms": generation.duration_ms,
        "faces_redone": generation.faces_redone,
    }


def generation_answer(generation: Generation) -> dict[str, Any]:
    """/txt2img's answer once the images are made (the images themselves aside), with the
    parameters it ran with (its size filled when the request left it out)."""
    return {
        "generation_id": generation.pk,
        "parameters": generation.parameters,
        **generation_summary(generation),
        "image_urls": links.generation_image_urls(generation),
    }


def generation_queued_body(generation: Generation) -> dict[str, Any]:
    """/txt2img's 202 answer with "async": true: where to follow the generation."""
    return {
        "generation_id": generation.pk,
        "status": generation.status,
        "status_url": links.generation_url(generation),
        **generation_queue_body(generation),
    }


def generation_status_body(generation: Generation) -> dict[str, Any]:
    """GET /generations/<id>: where the job is, what it asked for and, once completed, what
    it used and where its images are."""
    status = generation.status
    params = generation.parameters
    return {
        "generation_id": generation.pk,
        "status": status,
        "prompt": generation.prompt,
        "negative_prompt": generation.negative_prompt,
        "parameters": params,
        "step": generation.step,
        "total_steps": generation.total_steps,
        "created_at": generation.created_at,
        "started_at": generation.started_at,
        "finished_at": generation.finished_at,
        "message": generation.error_message or None if status in _WITH_MESSAGE else None,
        **generation_summary(generation),
        "seeds": image_seeds(generation.seed, params["num_images"]),
        "image_urls": links.generation_image_urls(generation),
        **generation_queue_body(generation),
    }
