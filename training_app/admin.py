"""Admin: LoRA files (download), training runs, generations and live workers."""

from django.contrib import admin
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from sessions_app import storage
from sessions_app.admin import ReadOnlyAdmin, file_response
from training_app.models import Generation, LoraArtifact, TrainingRun, WorkerHeartbeat
from training_app.services.generations import generations_dir


@admin.register(LoraArtifact)
class LoraArtifactAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "number", "source", "size", "sha256", "created_at", "download"]
    list_filter = ["source"]
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
        "download",
    ]

    def has_delete_permission(self, request, obj=None):
        return False  # numbers are never reused; files leave with their session

    @admin.display(description="file")
    def download(self, artifact: LoraArtifact) -> str:
        url = reverse("admin:training_app_loraartifact_download", args=[artifact.pk])
        return format_html('<a href="{}">download</a>', url)

    def get_urls(self):
        return [
            path(
                "<int:pk>/download/",
                self.admin_site.admin_view(self.download_file),
                name="training_app_loraartifact_download",
            ),
            *super().get_urls(),
        ]

    def download_file(self, request, pk: int):
        artifact = get_object_or_404(LoraArtifact, pk=pk)
        path_on_disk = storage.session_dir(artifact.session_id) / artifact.filename
        return file_response(
            path_on_disk,
            f"{artifact.filename} is missing from the session folder",
            as_attachment=True,
            filename=artifact.filename,
        )


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
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "stage"]
    readonly_fields = [
        "session",
        "status",
        "stage",
        "progress",
        "step",
        "total_steps",
        "last_loss",
        "parameters",
        "error_message",
        "task_id",
        "worker",
        "created_at",
        "started_at",
        "training_started_at",
        "finished_at",
        "heartbeat_at",
    ]


@admin.register(Generation)
class GenerationAdmin(ReadOnlyAdmin):
    list_display = [
        "__str__",
        "status",
        "prompt",
        "seed",
        "lora_filename",
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
        "lora",
        "lora_filename",
        "lora_sha256",
        "image_count",
        "images",
        "duration_ms",
        "error_message",
        "task_id",
        "created_at",
        "started_at",
        "finished_at",
    ]

    @admin.display(description="images")
    def images(self, generation: Generation) -> str:
        return format_html_join(
            " ",
            '<a href="{0}"><img src="{0}" style="max-width:256px"></a>',
            (
                (reverse("admin:training_app_generation_image", args=[generation.pk, index]),)
                for index in range(generation.image_count)
            ),
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
        return file_response(generations_dir(generation.pk) / f"{index}.png", "image not found")


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(ReadOnlyAdmin):
    list_display = ["queue", "host", "pid", "started_at", "last_seen"]
