"""The bodies of the session endpoints (docs/api.md): sessions, their training images and
the session detail.

Requests are validated by their serializer; responses are rendered through theirs, so the
OpenAPI description at /api/schema is built from the same classes that shape the bodies.
"""

from typing import Any

from django.conf import settings
from rest_framework import serializers
from rest_framework.fields import SkipField

from sdxl_service.api import field_aliases
from sdxl_service.api.fields import (
    Base64BytesField,
    SessionIdField,
    StrictIntegerField,
    StringField,
)
from sdxl_service.api.training.serializers import (
    TrainingQueuePlace,
    TrainStatusField,
    init_lora_field,
)
from training_app.models import TrainingRun


class SessionRefSerializer(serializers.Serializer[Any]):
    session_id = SessionIdField()


class PostSessionImageSerializer(serializers.Serializer[Any]):
    field_alias_context = field_aliases.IMAGE

    session_id = SessionIdField()
    image_base64 = Base64BytesField()
    # May be empty: such an image trains with /train_lora's trigger as its whole caption.
    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS, allow_blank=True)


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
        "training trigger alone)",
    )
    archive = serializers.FileField(
        required=False,
        help_text="a zip of images, each with its caption in a .txt of the same name beside it "
        "(kohya's dataset layout); an image without one has an empty caption",
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
    limit = StrictIntegerField(
        min_value=1,
        max_value=1000,
        required=False,
        help_text="at most this many sessions (oldest first); left out: every session",
    )
    offset = StrictIntegerField(
        min_value=0, required=False, help_text="skip this many sessions first (default 0)"
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
