"""Admin: LoRA files and checkpoints (download), training runs with their sample images and
checkpoints, generations and live workers. A session's page, which starts and cancels its
training, is sdxl_service.admin's."""

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path
from django.utils.html import format_html, format_html_join
from django.utils.http import content_disposition_header

from core.errors import ServiceError
from sessions_app.admin import ReadOnlyAdmin, file_response
from sessions_app.links import session_admin_url
from training_app import links
from training_app.charts import scores_chart_svg
from training_app.models import (
    Generation,
    GenerationLora,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
    TrainingSample,
    WebhookDelivery,
    WorkerHeartbeat,
)
from training_app.services.generations.lifecycle import generations_dir
from training_app.services.loras import LORA_FORMATS, lora_file_path, lora_read
from training_app.services.watch import header_score, sample_path


def sample_figures(samples) -> str:
    """Sample images as linked thumbnails, each captioned with its run, step and prompt."""
    samples = list(samples)
    if not samples:
        return "-"
    return format_html_join(
        "",
        '<figure style="display:inline-block;margin:0 8px 8px 0;max-width:256px">'
        '<a href="{0}"><img src="{0}" style="max-width:256px;max-height:256px" alt="{3}">'
        "</a><figcaption>run {1}, step {2}: {3}</figcaption></figure>",
        (
            (
                links.training_sample_admin_url(sample),
                sample.run_id,
                sample.step,
                sample.prompt,
            )
            for sample in samples
        ),
    )


def lora_download_links(lora: LoraArtifact) -> str:
    """One download link per form a LoRA is served in (services.loras.lora_read)."""
    return format_html_join(
        " | ",
        '<a href="{}" download>{}</a>',
        ((links.lora_download_as_admin_url(lora, form), form) for form in LORA_FORMATS),
    )


class LoraFileAdmin(ReadOnlyAdmin):
    """A LoRA file's row (a numbered LoRA or a run's checkpoint) with a download link."""

    def _download_url_name(self) -> str:
        return f"{self.model._meta.app_label}_{self.model._meta.model_name}_download"

    @admin.display(description="file")
    def download(self, lora) -> str:
        url = links.lora_file_download_admin_url(lora)
        return format_html('<a href="{}">download</a>', url)

    def get_urls(self):
        return [
            path(
                "<int:pk>/download/",
                self.admin_site.admin_view(self.download_file),
                name=self._download_url_name(),
            ),
            *super().get_urls(),
        ]

    def download_file(self, request, pk: int):
        lora = get_object_or_404(self.model, pk=pk)
        return file_response(
            lora_file_path(lora),
            f"{lora.filename} is missing from the session folder",
            as_attachment=True,
            filename=lora.filename,
        )


@admin.register(LoraArtifact)
class LoraArtifactAdmin(LoraFileAdmin):
    list_display = ["__str__", "number", "source", "size", "sha256", "created_at", "downloads"]
    list_filter = ["source"]
    search_fields = ["filename", "sha256", "=session__id"]
    search_help_text = "filename, sha256 (or a part of either), or a session id"
    readonly_fields = [
        "session",
        "number",
        "filename",
        "size",
        "sha256",
        "source",
        "training_run",
        "metadata",
        "created_at",
        "downloads",
    ]

    def has_delete_permission(self, request, obj=None):
        return False  # numbers are never reused; files leave with their session

    @admin.display(description="download")
    def downloads(self, lora: LoraArtifact) -> str:
        return lora_download_links(lora)

    def get_urls(self):
        return [
            path(
                "<int:pk>/download/<str:lora_format>/",
                self.admin_site.admin_view(self.download_as),
                name="training_app_loraartifact_download_as",
            ),
            *super().get_urls(),
        ]

    def download_as(self, request, pk: int, lora_format: str):
        """The LoRA's bytes in `lora_format` (diffusers: the file; kohya: converted)."""
        lora = get_object_or_404(LoraArtifact, pk=pk)
        if not self.has_view_permission(request, lora):
            raise PermissionDenied
        if lora_format not in LORA_FORMATS:
            raise Http404(f"no LoRA format {lora_format!r}")
        try:
            body = lora_read(lora, lora_format)
        except ServiceError as error:
            if error.status == 404:
                raise Http404(error.message) from None
            self.message_user(request, error.message, messages.ERROR)
            return HttpResponseRedirect(session_admin_url(lora.session_id))
        filename = lora.filename
        if lora_format != LORA_FORMATS[0]:
            filename = filename.removesuffix(".safetensors") + f".{lora_format}.safetensors"
        return HttpResponse(
            body,
            content_type="application/octet-stream",
            headers={"Content-Disposition": content_disposition_header(True, filename)},
        )


@admin.register(TrainingCheckpoint)
class TrainingCheckpointAdmin(LoraFileAdmin):
    list_display = ["__str__", "run", "step", "size", "sha256", "created_at", "download"]
    readonly_fields = [
        "run",
        "session",
        "step",
        "filename",
        "size",
        "sha256",
        "eval_loss",
        "similarity",
        "metadata",
        "created_at",
        "download",
    ]

    def has_delete_permission(self, request, obj=None):
        return False  # rows mirror files: prune_loras, or the session's deletion, removes both


@admin.register(TrainingRun)
class TrainingRunAdmin(ReadOnlyAdmin):
    list_display = [
        "__str__",
        "session",
        "status",
        "stage",
        "progress",
        "step",
        "total_steps",
        "last_loss",
        "attempts",
        "resumed_from_step",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "stage"]
    search_fields = ["status", "error_message", "=session__id"]
    search_help_text = "status, error message (or a part), or a session id"
    readonly_fields = [
        "session",
        "status",
        "stage",
        "progress",
        "step",
        "total_steps",
        "last_loss",
        "parameters",
        "init_lora",
        "error_message",
        "task_id",
        "worker",
        "attempts",
        "resumed_from_step",
        "created_at",
        "started_at",
        "training_started_at",
        "finished_at",
        "heartbeat_at",
        "eval_loss",
        "similarity",
        "curves_and_samples",
        "checkpoint_files",
    ]

    @admin.display(description="curves and sample images")
    def curves_and_samples(self, run: TrainingRun) -> str:
        """The loss curves (charts.scores_chart_svg), then the sample images of each step
        under that step's scores."""
        checkpoints = list(run.checkpoints.all())
        scores = {
            c.step: {"eval_loss": c.eval_loss, "similarity": c.similarity} for c in checkpoints
        }
        evaluation = [(c.step, c.eval_loss) for c in checkpoints if c.eval_loss is not None]
        similarity = [(c.step, c.similarity) for c in checkpoints if c.similarity is not None]
        artifact = getattr(run, "artifact", None)
        headers = [c.metadata for c in checkpoints] + ([artifact.metadata] if artifact else [])
        start = next(
            (score for h in headers if (score := header_score(h, "eval_loss_start")) is not None),
            None,
        )
        if start is not None:
            evaluation.insert(0, (0, start))
        if run.status == TrainingRun.Status.COMPLETED and run.total_steps:
            scores[run.total_steps] = {"eval_loss": run.eval_loss, "similarity": run.similarity}
            if run.eval_loss is not None:
                evaluation.append((run.total_steps, run.eval_loss))
            if run.similarity is not None:
                similarity.append((run.total_steps, run.similarity))
        chart = scores_chart_svg(
            [(step, loss) for step, loss in run.loss_history], evaluation, similarity
        )
        by_step: dict[int, list[TrainingSample]] = {}
        for sample in run.samples.all():
            by_step.setdefault(sample.step, []).append(sample)
        columns = format_html_join(
            "",
            '<div style="flex:none"><strong>step {}</strong> {}<div>{}</div></div>',
            (
                (
                    step,
                    _scores_text(scores.get(step, {})),
                    sample_figures(samples),
                )
                for step, samples in by_step.items()
            ),
        )
        if not chart and not by_step:
            return "-"
        return format_html(
            '<div>{}</div><div style="display:flex;gap:16px;overflow-x:auto">{}</div>',
            chart,
            columns,
        )

    @admin.display(description="checkpoints")
    def checkpoint_files(self, run: TrainingRun) -> str:
        checkpoints = run.checkpoints.all()
        if not checkpoints:
            return "-"
        return format_html(
            "<table><tr><th>step</th><th>file</th><th>size</th><th>eval loss</th>"
            "<th>similarity</th><th></th></tr>{}</table>",
            format_html_join(
                "",
                '<tr><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td>'
                '<td><a href="{}">download</a></td></tr>',
                (
                    (
                        checkpoint.step,
                        links.checkpoint_admin_url(checkpoint),
                        checkpoint.filename,
                        checkpoint.size,
                        _score(checkpoint.eval_loss),
                        _score(checkpoint.similarity),
                        links.lora_file_download_admin_url(checkpoint),
                    )
                    for checkpoint in checkpoints
                ),
            ),
        )

    def get_urls(self):
        return [
            path(
                "<int:pk>/sample/<int:sample_id>/",
                self.admin_site.admin_view(self.sample_file),
                name="training_app_trainingrun_sample",
            ),
            *super().get_urls(),
        ]

    def sample_file(self, request, pk: int, sample_id: int):
        sample = get_object_or_404(
            TrainingSample.objects.select_related("run"), pk=sample_id, run=pk
        )
        return file_response(
            sample_path(sample), f"{sample.filename} is missing", content_type="image/png"
        )


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _scores_text(scores: dict) -> str:
    """A step's eval loss and similarity, those known, for a caption."""
    known = [
        f"{name.replace('_', ' ')} {_score(scores[name])}"
        for name in ("eval_loss", "similarity")
        if scores.get(name) is not None
    ]
    return f"({', '.join(known)})" if known else ""


class GenerationLoraInline(admin.TabularInline):
    """The LoRAs a generation applied, in order, with their scales."""

    model = GenerationLora
    fields = ["position", "source_session_id", "filename", "scale", "sha256", "lora", "checkpoint"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Generation)
class GenerationAdmin(ReadOnlyAdmin):
    inlines = [GenerationLoraInline]
    list_display = [
        "__str__",
        "status",
        "prompt",
        "seed",
        "loras",
        "image_count",
        "duration_ms",
        "created_at",
    ]
    list_filter = ["status"]
    search_fields = ["prompt"]
    readonly_fields = [
        "status",
        "prompt",
        "negative_prompt",
        "parameters",
        "seed",
        "session",
        "image_count",
        "images",
        "duration_ms",
        "error_message",
        "task_id",
        "created_at",
        "started_at",
        "finished_at",
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("applied_loras")

    @admin.display(description="LoRAs")
    def loras(self, generation: Generation) -> str:
        return ", ".join(
            f"{lora.filename} ({lora.scale:g})" for lora in generation.applied_loras.all()
        )

    @admin.display(description="images")
    def images(self, generation: Generation) -> str:
        return format_html_join(
            " ",
            '<a href="{0}"><img src="{0}" style="max-width:256px"></a>',
            ((url,) for url in links.generation_image_admin_urls(generation)),
        )

    def get_urls(self):
        return [
            path(
                "<int:pk>/image/<int:index>/",
                self.admin_site.admin_view(self.image_file),
                name="training_app_generation_image",
            ),
            *super().get_urls(),
        ]

    def image_file(self, request, pk: int, index: int):
        generation = get_object_or_404(Generation, pk=pk)
        return file_response(
            generations_dir(generation.pk) / generation.image_filename(index), "image not found"
        )


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """Every webhook event and what its receiver answered (services.webhooks)."""

    list_display = [
        "__str__",
        "event",
        "status",
        "attempts",
        "last_status_code",
        "url",
        "run",
        "generation",
        "created_at",
        "delivered_at",
    ]
    list_filter = ["status", "event"]
    search_fields = ["url", "last_error"]
    readonly_fields = [
        "event",
        "url",
        "run",
        "generation",
        "payload",
        "status",
        "attempts",
        "next_attempt_at",
        "claimed_at",
        "last_status_code",
        "last_error",
        "created_at",
        "delivered_at",
    ]


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(ReadOnlyAdmin):
    list_display = ["queue", "host", "pid", "started_at", "last_seen"]
