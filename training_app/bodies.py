"""Every JSON shape of runs, LoRA files and generations that an answer and a webhook event
share, built in this one module from the rows the selectors read: a training status (the
five shapes of /train_status, which /list_sessions and the training events carry), a
generation's status (GET /generations/<id> and its events), what a generation used
(/txt2img's answer) and a session's detail. The API renders them through its response
serializers; the webhooks post them as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdxl_engine.parameters import image_seeds
from sessions_app.links import session_image_url
from sessions_app.models import TrainingImage
from training_app import links
from training_app.models import Generation, TrainingRun
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
        **_kept_along_the_way(run),
    }


def _kept_along_the_way(run: TrainingRun) -> dict[str, Any]:
    """The run's sample images and checkpoints so far, and the step it resumed from."""
    return {
        "samples": [
            {
                "step": sample.step,
                "prompt": sample.prompt,
                "url": links.training_sample_url(sample),
            }
            for sample in run.samples.all()
        ],
        "checkpoints": [
            {"step": checkpoint.step, "lora_filename": checkpoint.filename}
            for checkpoint in run.checkpoints.all()
        ],
        "resumed_from_step": run.resumed_from_step,
    }


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
                "message": run.error_message or None,
                "created_at": run.created_at,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
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
        "duration_ms": generation.duration_ms,
    }


def generation_answer(generation: Generation) -> dict[str, Any]:
    """/txt2img's answer once the images are made (the images themselves aside)."""
    return {
        "generation_id": generation.pk,
        **generation_summary(generation),
        "image_urls": links.generation_image_urls(generation),
    }


def generation_queued_body(generation: Generation) -> dict[str, Any]:
    """/txt2img's 202 answer with "async": true: where to follow the generation."""
    return {
        "generation_id": generation.pk,
        "status": generation.status,
        "status_url": links.generation_url(generation),
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
    }
