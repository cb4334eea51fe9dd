"""Admin: browse sessions, their image groups (thumbnails, masks beside them, and captions)
and images.

Rows mirror files, so the admin mostly reads. What it changes goes through the services,
which change the files too: a caption edited inline on the session's page rewrites the
image's `<k>.txt` (refused while the session trains), and deleting a session removes its
folder.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Model, QuerySet
from django.http import FileResponse, Http404, HttpRequest
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path
from django.utils.html import format_html

from core.errors import ServiceError
from sessions_app import services, storage
from sessions_app.links import training_image_admin_url, training_image_mask_admin_url
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
    """The image as a linked thumbnail, with its mask's beside it when it has one."""
    if image is None:
        return "-"
    shown = _linked_thumbnail(training_image_admin_url(image), size, image.file)
    if not image.mask_file:
        return shown
    mask = _linked_thumbnail(training_image_mask_admin_url(image), size, image.mask_file)
    return format_html("{} {}", shown, mask)


def _linked_thumbnail(url: str, size: int, alt: str) -> str:
    return format_html(
        '<a href="{}"><img src="{}" style="max-width:{}px;max-height:{}px" alt="{}"></a>',
        url,
        url,
        size,
        size,
        alt,
    )


class ImageGroupCaptionForm(forms.ModelForm[ImageGroup]):
    """A group's row with its image's caption to edit (trimmed, as every caption is). A
    group the API made holds one image; one with several (dropped in by hand) shows its
    first image's caption, not editable here."""

    caption = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2, "cols": 60}),
        required=False,
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
    )

    class Meta:
        model = ImageGroup
        fields = ("caption",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        images = list(self.instance.images.all()[:2]) if self.instance.pk else []
        self.image = images[0] if images else None
        caption = self.fields["caption"]
        caption.initial = self.image.caption if self.image else ""
        if len(images) != 1:
            caption.disabled = True
            caption.help_text = "a group of several images: edit their .txt files, then rescan"

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        if "caption" in self.changed_data:
            refusal = services.training_refusal(self.instance.session)
            if refusal is not None:
                raise ValidationError(refusal.message)
        return cleaned


class ImageGroupInline(admin.TabularInline[ImageGroup, Session]):
    model = ImageGroup
    form = ImageGroupCaptionForm
    fields = ("number", "preview", "caption", "created_at")
    readonly_fields = ("number", "preview", "created_at")
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Session | None = None) -> bool:
        return False

    @admin.display(description="image")
    def preview(self, group: ImageGroup) -> str:
        return thumbnail(group.images.first())


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin[Session]):
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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # sessions are made through the API (/create_session)

    def save_model(self, request: HttpRequest, obj: Session, form: Any, change: bool) -> None:
        pass  # every field of the session is read-only; saving it could undo a counter

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        """The captions edited inline, each through the service that rewrites its file."""
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for group_form in formset.forms:
            image = getattr(group_form, "image", None)
            if image is None or "caption" not in group_form.changed_data:
                continue
            try:
                services.training_image_caption_set(
                    image.group.session_id, image.pk, group_form.cleaned_data["caption"]
                )
            except ServiceError as error:  # a run started since the form was checked
                messages.error(request, f"{image.file}: caption not saved: {error.message}")
                continue
            formset.changed_objects.append((group_form.instance, ["caption"]))

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
    list_display = [
        "file",
        "preview",
        "has_mask",
        "caption",
        "image_format",
        "width",
        "height",
        "size",
    ]
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
        "mask_file",
        "mask_size",
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

    @admin.display(description="mask", boolean=True)
    def has_mask(self, image: TrainingImage) -> bool:
        return bool(image.mask_file)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:pk>/file/",
                self.admin_site.admin_view(self.image_file),
                name="sessions_app_trainingimage_file",
            ),
            path(
                "<int:pk>/mask/",
                self.admin_site.admin_view(self.mask_image_file),
                name="sessions_app_trainingimage_mask",
            ),
            *super().get_urls(),
        ]

    def image_file(self, request: HttpRequest, pk: int) -> FileResponse:
        image = get_object_or_404(TrainingImage, pk=pk)
        return file_response(
            storage.absolute_path(image.file), f"{image.file} is missing from the data dir"
        )

    def mask_image_file(self, request: HttpRequest, pk: int) -> FileResponse:
        image = get_object_or_404(TrainingImage, pk=pk)
        if not image.mask_file:
            raise Http404(f"{image.file} has no mask")
        return file_response(
            storage.absolute_path(image.mask_file),
            f"{image.mask_file} is missing from the data dir",
            content_type="image/png",
        )
