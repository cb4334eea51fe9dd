"""Admin: browse sessions, their image groups (thumbnails and captions) and images.

Rows mirror files, so the admin reads; deleting a session goes through the service,
which removes its folder too.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import FileResponse, Http404, HttpRequest
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path
from django.utils.html import format_html

from sessions_app import services, storage
from sessions_app.links import training_image_admin_url
from sessions_app.models import ImageGroup, Session, TrainingImage

AdminModel = TypeVar("AdminModel", bound=Model)


class ReadOnlyAdmin(admin.ModelAdmin[AdminModel]):
    def has_add_permission(self, request: HttpRequest, obj: AdminModel | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AdminModel | None = None) -> bool:
        return False


def file_response(path: Path, missing: str, **options: Any) -> FileResponse:
    """The file streamed to an admin, or a 404 saying `missing` when it is gone from disk."""
    try:
        return FileResponse(open(path, "rb"), **options)
    except FileNotFoundError:
        raise Http404(missing) from None


def thumbnail(image: TrainingImage | None, size: int = 96) -> str:
    if image is None:
        return "-"
    url = training_image_admin_url(image)
    return format_html(
        '<a href="{}"><img src="{}" style="max-width:{}px;max-height:{}px" alt="{}"></a>',
        url,
        url,
        size,
        size,
        image.file,
    )


class ImageGroupInline(admin.TabularInline[ImageGroup, Session]):
    model = ImageGroup
    readonly_fields = ("number", "preview", "caption", "created_at")
    fields = readonly_fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False

    @admin.display(description="image")
    def preview(self, group: ImageGroup) -> str:
        return thumbnail(group.images.first())

    @admin.display(description="caption")
    def caption(self, group: ImageGroup) -> str:
        image = group.images.first()
        return image.caption if image else "-"


@admin.register(Session)
class SessionAdmin(ReadOnlyAdmin[Session]):
    list_display = [
        "__str__",
        "owner",
        "created_at",
        "group_count",
        "lora_count",
        "next_lora_number",
    ]
    list_filter = ["owner"]
    readonly_fields = ["owner", "created_at", "next_group_number", "next_lora_number", "folder"]
    inlines = [ImageGroupInline]
    search_fields = ["=id", "image_groups__images__caption"]
    search_help_text = "a session id, or words of a caption"

    @admin.display(description="image groups")
    def group_count(self, session: Session) -> int:
        return session.image_groups.count()

    @admin.display(description="LoRAs")
    def lora_count(self, session: Session) -> int:
        return session.loras.count()

    @admin.display(description="folder")
    def folder(self, session: Session) -> str:
        return str(storage.session_dir(session.pk))

    def get_deleted_objects(
        self, objs: Sequence[Session] | QuerySet[Session], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        # Images and LoRA files cannot be deleted one by one (rows mirror files), but a
        # session goes whole, through its service: that is permission enough for them.
        deleted, model_count, _, protected = super().get_deleted_objects(objs, request)
        return deleted, model_count, set(), protected

    def delete_model(self, request: HttpRequest, obj: Session) -> None:
        services.session_delete(obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Session]) -> None:
        for session_id in list(queryset.values_list("pk", flat=True)):
            services.session_delete(session_id)


@admin.register(TrainingImage)
class TrainingImageAdmin(ReadOnlyAdmin[TrainingImage]):
    list_display = ["file", "preview", "caption", "image_format", "width", "height", "size"]
    list_filter = ["image_format"]
    search_fields = ["caption", "file"]
    readonly_fields = [
        "group",
        "file",
        "preview_large",
        "caption",
        "image_format",
        "width",
        "height",
        "size",
        "sha256",
        "created_at",
    ]

    def has_delete_permission(self, request: HttpRequest, obj: TrainingImage | None = None) -> bool:
        return False  # a session is deleted whole, through its own page

    @admin.display(description="image")
    def preview(self, image: TrainingImage) -> str:
        return thumbnail(image)

    @admin.display(description="image")
    def preview_large(self, image: TrainingImage) -> str:
        return thumbnail(image, size=512)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:pk>/file/",
                self.admin_site.admin_view(self.image_file),
                name="sessions_app_trainingimage_file",
            ),
            *super().get_urls(),
        ]

    def image_file(self, request: HttpRequest, pk: int) -> FileResponse:
        image = get_object_or_404(TrainingImage, pk=pk)
        return file_response(
            storage.absolute_path(image.file), f"{image.file} is missing from the data dir"
        )
