"""The bodies of the LoRA file endpoints, and how a request names one LoRA of a session
(by iteration or by file name), which /txt2img's choices share."""

from typing import Any

from rest_framework import serializers

from sdxl_service.api import field_aliases
from sdxl_service.api.fields import (
    Base64BytesField,
    ChoiceField,
    SessionIdField,
    StrictIntegerField,
    StringField,
)
from training_app.services.loras import LORA_FORMATS

ITERATION: dict[str, Any] = {
    "min_value": 1,
    "max_value": 2**31 - 1,
    "required": False,
    "allow_null": True,
}


def lora_filename_field() -> serializers.CharField:
    return StringField(
        max_length=255,
        required=False,
        allow_null=True,
        help_text="any LoRA file of the session by name, a run's checkpoint "
        "(lora_run<run>_step<step>.safetensors) included; instead of iteration",
    )


def one_way_to_name_a_lora(attrs: dict[str, Any]) -> dict[str, Any]:
    if attrs.get("iteration") is not None and attrs.get("lora_filename") is not None:
        raise serializers.ValidationError("give iteration or lora_filename, not both")
    return attrs


class GetLoraSerializer(serializers.Serializer[Any]):
    field_alias_context = field_aliases.LORA_FILE

    session_id = SessionIdField()
    iteration = StrictIntegerField(**ITERATION)
    lora_filename = lora_filename_field()
    format = ChoiceField(
        choices=LORA_FORMATS,
        default=LORA_FORMATS[0],
        help_text="diffusers: the stored file; kohya: the same adapter for AUTOMATIC1111, "
        "ComfyUI and sd-scripts",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return one_way_to_name_a_lora(attrs)


class LoraFileQuerySerializer(serializers.Serializer[Any]):
    """GET /sessions/<id>/loras/<file>'s query string."""

    format = serializers.ChoiceField(
        choices=LORA_FORMATS,
        default=LORA_FORMATS[0],
        help_text="diffusers: the stored file; kohya: the same adapter for AUTOMATIC1111, "
        "ComfyUI and sd-scripts, saved as <stem>.kohya.safetensors",
    )


class UploadLoraFileSerializer(serializers.Serializer[Any]):
    """/upload_lora as multipart/form-data: the file itself instead of base64."""

    field_alias_context = field_aliases.LORA_FILE

    session_id = SessionIdField()
    lora = serializers.FileField(help_text="the .safetensors file: `-F lora=@my_lora.safetensors`")
    filename = StringField(max_length=200, required=False, allow_null=True)


class UploadLoraSerializer(serializers.Serializer[Any]):
    field_alias_context = field_aliases.LORA_FILE

    session_id = SessionIdField()
    lora_base64 = Base64BytesField(
        help_text="a .safetensors LoRA or LoCon (any Linear or Conv2d module of the Base UNet "
        "and both text encoders) in diffusers, PEFT or kohya/LyCORIS form; LoHa, LoKr, DoRA "
        "and other adapter kinds are refused"
    )
    filename = StringField(max_length=200, required=False, allow_null=True)


class GetLoraResponse(serializers.Serializer[Any]):
    session_id = serializers.CharField()
    lora_filename = serializers.CharField()
    lora_base64 = serializers.CharField(help_text="the safetensors file, base64")
    iteration = serializers.IntegerField(allow_null=True, help_text="null for a checkpoint")
    format = serializers.ChoiceField(choices=LORA_FORMATS)
    sha256 = serializers.CharField(help_text="of the bytes in lora_base64")
    lora_url = serializers.CharField(
        help_text="the same file (in the same format) as a plain download: GET it with the "
        "same token (ranges, ETag)"
    )


class UploadLoraResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["success"])
    lora_filename = serializers.CharField()
    iteration = serializers.IntegerField()
