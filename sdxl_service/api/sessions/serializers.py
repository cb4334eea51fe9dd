"""The bodies of the session endpoints (docs/api.md): sessions, their training images and
the session detail.

Requests are validated by their serializer; responses are rendered through theirs, so the
OpenAPI description at /api/schema is built from the same classes that shape the bodies.
"""

from typing import Any

from django.conf import settings
from rest_framework import serializers
from rest_framework.fields import SkipField

from sdxl_engine.masking import DEFAULT_SUBJECT_PROMPT
from sdxl_service.api import field_aliases
from sdxl_service.api.fields import (
    Base64BytesField,
    ChoiceField,
    QueryIntegerField,
    SessionIdField,
    StringField,
)
from sdxl_service.api.training.serializers import (
    TrainingQueuePlace,
    TrainStatusField,
    init_lora_field,
)
from sessions_app.automasks import MASK_KINDS
from training_app.models import TrainingRun

_MASK_HELP = (
    "the image's mask, base64 (PNG, JPEG, WebP or BMP): white (opaque) where the subject "
    "is, black (or transparent) elsewhere; of the image's aspect ratio (resized to its size), "
    "not all black. Stored as a greyscale PNG `<k>_mask.png` beside the image"
)


class SessionRefSerializer(serializers.Serializer[Any]):
    session_id = SessionIdField()


class PostSessionImageSerializer(serializers.Serializer[Any]):
    field_alias_context = field_aliases.IMAGE

    session_id = SessionIdField()
    image_base64 = Base64BytesField()
    # May be empty: such an image trains with /train_lora's trigger as its whole caption.
    prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        allow_blank=True,
        help_text='the image\'s caption (may be empty); "auto": written by the captioning '
        "model (SDXL_CAPTION_MODEL), as POST /sessions/<id>/captions writes them",
    )
    mask_base64 = Base64BytesField(required=False, help_text=_MASK_HELP)


class SessionImagesUploadSerializer(serializers.Serializer[Any]):
    """POST /sessions/<id>/images, multipart/form-data."""

    field_alias_context = field_aliases.IMAGE_FILES

    image = serializers.ListField(
        child=serializers.FileField(),
        required=False,
        help_text="image files (PNG, JPEG, WebP, BMP), as many as you like: `-F image=@a.jpg "
        "-F image=@b.jpg`",
    )
    caption = serializers.ListField(
        # Trimmed, as every caption is (whitespace and newlines around it).
        child=serializers.CharField(max_length=settings.SDXL_MAX_PROMPT_CHARS, allow_blank=True),
        required=False,
        help_text="one caption per image, in the same order; none: every caption empty (the "
        'training trigger alone); "auto": written by the captioning model',
    )
    mask = serializers.ListField(
        child=serializers.FileField(),
        required=False,
        help_text="one mask per image, in the same order (none: no image has a mask): white "
        "where the subject is, of the image's aspect ratio, not all black",
    )
    archive = serializers.FileField(
        required=False,
        help_text="a zip of images, each with its caption in a .txt of the same name beside it "
        "(kohya's dataset layout) and its mask as <name>_mask.png, if it has one; an image "
        "without a .txt has an empty caption",
    )


class SessionImagePatchSerializer(serializers.Serializer[Any]):
    """PATCH /sessions/<id>/images/<image_id>: the image's new caption."""

    # Never partial: `caption` is the one field, so it is required. drf-spectacular makes a
    # PATCH's serializer partial, which would describe a body without it.
    @property
    def partial(self) -> bool:
        return False

    @partial.setter
    def partial(self, value: bool) -> None:
        pass

    caption = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        allow_blank=True,
        help_text="the new caption, trimmed of whitespace and newlines around it; written to "
        "the image's `<k>.txt` (empty: the training trigger alone)",
    )


class SessionMasksSerializer(serializers.Serializer[Any]):
    """POST /sessions/<id>/masks."""

    kind = ChoiceField(
        choices=list(MASK_KINDS),
        help_text="`face`: a feathered ellipse around each face (OpenCV's face detector); "
        "`subject`: what `prompt` names, by the segmentation model SDXL_SUBJECT_MASK_MODEL",
    )
    overwrite = serializers.BooleanField(
        default=False,
        help_text="mask every image, replacing the masks they have; false: only the images "
        "without a mask",
    )
    prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        required=False,
        help_text=f'subject masks only: what to segment (default "{DEFAULT_SUBJECT_PROMPT}")',
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "prompt" in attrs and attrs["kind"] != "subject":
            raise serializers.ValidationError({"prompt": "only subject masks take a prompt"})
        return attrs


class SessionMaskItem(serializers.Serializer[Any]):
    image_id = serializers.IntegerField()
    found = serializers.BooleanField(
        help_text="a face (or the subject) was found and the image's mask is new; false: the "
        "image keeps what it had"
    )
    faces = serializers.IntegerField(
        allow_null=True, help_text="face masks: how many faces were found; null for subject"
    )
    mask_url = serializers.CharField(allow_null=True, help_text="the new mask; null if none")


class SessionMasksResponse(serializers.Serializer[Any]):
    kind = serializers.ChoiceField(choices=list(MASK_KINDS))
    prompt = serializers.CharField(
        allow_null=True, help_text="what subject masks segmented; null for face masks"
    )
    images = SessionMaskItem(
        many=True, help_text="each image looked at, in the session's order (not the skipped)"
    )
    masked = serializers.IntegerField(help_text="how many images got a new mask")
    skipped = serializers.IntegerField(
        help_text="images left alone because they had a mask (overwrite false)"
    )


class SessionCaptionsSerializer(serializers.Serializer[Any]):
    """POST /sessions/<id>/captions: captions written by the captioning model."""

    overwrite = serializers.BooleanField(
        default=False,
        help_text="caption every image, replacing the captions it has; false (default): "
        "only the images whose caption is empty, never touching one that has a caption",
    )
    prefix = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        allow_blank=True,
        default="",
        help_text="put before each generated caption, with a space (cog-sdxl's caption_prefix), "
        'e.g. "a photo of TOK,"',
    )


class CaptionedImageItem(serializers.Serializer[Any]):
    image_id = serializers.IntegerField()
    caption = serializers.CharField(allow_blank=True, help_text="the image's caption now")
    written = serializers.BooleanField(help_text="whether this request wrote it")


class SessionCaptionsResponse(serializers.Serializer[Any]):
    captioned = serializers.IntegerField(help_text="how many captions were written")
    skipped = serializers.IntegerField(help_text="how many images kept their caption")
    images = CaptionedImageItem(many=True, help_text="every image of the session, in order")


class SessionImageMaskSerializer(serializers.Serializer[Any]):
    """PUT /sessions/<id>/images/<image_id>/mask: the image's new mask."""

    field_alias_context = field_aliases.IMAGE

    mask_base64 = Base64BytesField(help_text=_MASK_HELP)


class DeleteSessionImageResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["deleted"])
    session_id = serializers.CharField()
    image_id = serializers.IntegerField()


class CreateSessionResponse(serializers.Serializer[Any]):
    session_id = serializers.IntegerField()


class SuccessResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["success"])


class DeleteSessionResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["deleted"])
    session_id = serializers.CharField()


class SessionSummary(serializers.Serializer[Any]):
    session_id = serializers.CharField()
    latest_lora = serializers.CharField(allow_null=True)
    image_groups = serializers.IntegerField()
    training = TrainStatusField()


class ListSessionsQuery(serializers.Serializer[Any]):
    limit = QueryIntegerField(
        min_value=1,
        max_value=1000,
        required=False,
        help_text="at most this many sessions (oldest first); left out: every session",
    )
    offset = QueryIntegerField(
        required=False, help_text="skip this many sessions first (default 0)"
    )


class _OnlyWhenPaging(serializers.IntegerField):
    """A nullable key that is left out, not null, when the body lacks it: DRF would render
    a missing nullable field as null."""

    def get_attribute(self, instance: dict[str, Any]) -> Any:
        if self.field_name not in instance:
            raise SkipField()
        return super().get_attribute(instance)


class ListSessionsResponse(serializers.Serializer[Any]):
    sessions = SessionSummary(many=True)
    count = serializers.IntegerField(
        required=False, help_text="with limit or offset: how many sessions there are in all"
    )
    next_offset = _OnlyWhenPaging(
        required=False,
        allow_null=True,
        help_text="with limit or offset: the offset of the next page; null after the last",
    )


class SessionImageItem(serializers.Serializer[Any]):
    image_id = serializers.IntegerField()
    group = serializers.IntegerField(help_text="the upload group's number (its folder)")
    url = serializers.CharField(help_text="the image file, with the API's access rules")
    caption = serializers.CharField(allow_blank=True)
    format = serializers.CharField()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    size = serializers.IntegerField(help_text="bytes")
    mask_url = serializers.CharField(
        allow_null=True,
        help_text="its mask, a greyscale PNG (white: the subject); null when it has none",
    )


class SessionLoraItem(serializers.Serializer[Any]):
    lora_filename = serializers.CharField()
    iteration = serializers.IntegerField()
    sha256 = serializers.CharField()
    size = serializers.IntegerField(help_text="bytes")
    # A field named like Field.source: DRF's metaclass takes declared fields out of the
    # class, so the two never meet (the stubs cannot know).
    source = serializers.ChoiceField(choices=["trained", "uploaded", "found"])  # type: ignore[assignment]
    run_id = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class SessionCheckpointItem(serializers.Serializer[Any]):
    lora_filename = serializers.CharField()
    run_id = serializers.IntegerField()
    step = serializers.IntegerField()
    sha256 = serializers.CharField()


class SessionRunItem(TrainingQueuePlace):
    run_id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=TrainingRun.Status.values)
    stage = serializers.ChoiceField(choices=TrainingRun.Stage.values)
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(allow_null=True)
    parameters = serializers.DictField()
    init_lora = init_lora_field()
    message = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class SessionGenerationItem(serializers.Serializer[Any]):
    generation_id = serializers.IntegerField()
    status = serializers.CharField()
    prompt = serializers.CharField()
    created_at = serializers.DateTimeField()
    status_url = serializers.CharField()


class SessionImagesUploadResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["success"])
    images = SessionImageItem(many=True, help_text="what was stored, in order")


class SessionDetailResponse(serializers.Serializer[Any]):
    session_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    images = SessionImageItem(many=True)
    loras = SessionLoraItem(many=True)
    checkpoints = SessionCheckpointItem(many=True)
    runs = SessionRunItem(many=True, help_text="oldest first")
    recent_generations = SessionGenerationItem(
        many=True, help_text="the newest 20 that applied one of the session's LoRAs"
    )
