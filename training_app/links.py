"""Every URL of runs, LoRA files and generations, built by route name in this one module:
the API's (named in sdxl_service/api/urls.py, a layer above, which only a test can check:
tests/test_links.py) and the admin's."""

from django.urls import reverse

from training_app.models import (
    Generation,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
    TrainingSample,
)


def training_sample_url(sample: TrainingSample) -> str:
    """The PNG a run rendered, with the API's access rules."""
    return reverse("training-sample", args=[sample.pk])


def generation_url(generation: Generation) -> str:
    """GET /generations/<id>: the generation's status."""
    return reverse("generation", args=[generation.pk])


def generation_image_urls(generation: Generation) -> list[str]:
    """Each image's GET /generations/<id>/<index>.<extension>."""
    return [
        reverse(
            "generation-image",
            args=[generation.pk, index, generation.image_filename(index).rsplit(".", 1)[1]],
        )
        for index in range(generation.image_count)
    ]


def lora_download_url(
    lora: LoraArtifact | TrainingCheckpoint, lora_format: str | None = None
) -> str:
    """GET /sessions/<id>/loras/<file>: the file (a numbered LoRA's or a checkpoint's) as a
    download; `?format=kohya` for another form than the stored one."""
    url = reverse("session-lora", args=[lora.session_id, lora.filename])
    return f"{url}?format={lora_format}" if lora_format and lora_format != "diffusers" else url


def training_sample_admin_url(sample: TrainingSample) -> str:
    return reverse("admin:training_app_trainingrun_sample", args=[sample.run_id, sample.pk])


def lora_download_as_admin_url(lora: LoraArtifact, lora_format: str) -> str:
    return reverse("admin:training_app_loraartifact_download_as", args=[lora.pk, lora_format])


def lora_file_download_admin_url(lora: LoraArtifact | TrainingCheckpoint) -> str:
    """The file as stored, a numbered LoRA's or a checkpoint's."""
    if isinstance(lora, TrainingCheckpoint):
        return reverse("admin:training_app_trainingcheckpoint_download", args=[lora.pk])
    return reverse("admin:training_app_loraartifact_download", args=[lora.pk])


def checkpoint_admin_url(checkpoint: TrainingCheckpoint) -> str:
    return reverse("admin:training_app_trainingcheckpoint_change", args=[checkpoint.pk])


def run_admin_url(run: TrainingRun) -> str:
    return reverse("admin:training_app_trainingrun_change", args=[run.pk])


def generation_image_admin_urls(generation: Generation) -> list[str]:
    return [
        reverse("admin:training_app_generation_image", args=[generation.pk, index])
        for index in range(generation.image_count)
    ]
