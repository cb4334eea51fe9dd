from django.conf import settings
from rest_framework import serializers

from sdxl_service.fields import (
    Base64BytesField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
)
from training_app.generations import SEED_BITS

_SEED = {"min_value": 0, "max_value": 2**SEED_BITS - 1, "required": False, "allow_null": True}
# Training images are cropped to a square of this side; 64 divides by what both the
# SDXL UNet (32) and the tiny test UNet (16) need, so a run never fails on it later.
TRAINING_RESOLUTION_MULTIPLE = 64


def _multiple_of(divisor: int):
    def check(value: int) -> int:
        if value % divisor:
            raise serializers.ValidationError(f"must be a multiple of {divisor}")
        return value

    return check


def _image_side(divisor: int = 8, **kwargs) -> serializers.IntegerField:
    return StrictIntegerField(
        min_value=64,
        max_value=settings.SDXL_MAX_IMAGE_SIDE,
        validators=[_multiple_of(divisor)],
        **kwargs,
    )


class TrainLoraSerializer(serializers.Serializer):
    """`session_id` and the optional training parameters of /train_lora."""

    session_id = SessionIdField()
    steps = StrictIntegerField(
        min_value=1, max_value=settings.SDXL_MAX_TRAINING_STEPS, required=False
    )
    epochs = StrictIntegerField(min_value=1, max_value=1000, required=False)
    batch_size = StrictIntegerField(min_value=1, max_value=64, required=False)
    learning_rate = StrictFloatField(min_value=1e-7, max_value=0.1, required=False)
    rank = StrictIntegerField(min_value=1, max_value=128, required=False)
    resolution = _image_side(TRAINING_RESOLUTION_MULTIPLE, required=False)
    seed = StrictIntegerField(**_SEED)

    def validate(self, attrs):
        if "steps" in attrs and "epochs" in attrs:
            raise serializers.ValidationError("give steps or epochs, not both")
        return attrs

    @staticmethod
    def training_parameters(validated: dict) -> dict:
        return {k: v for k, v in validated.items() if k != "session_id" and v is not None}


class GetLoraSerializer(serializers.Serializer):
    session_id = SessionIdField()
    iteration = StrictIntegerField(
        min_value=1, max_value=2**31 - 1, required=False, allow_null=True
    )


class UploadLoraSerializer(serializers.Serializer):
    session_id = SessionIdField()
    lora_base64 = Base64BytesField()
    filename = StringField(max_length=200, required=False, allow_null=True)


class Txt2ImgSerializer(serializers.Serializer):
    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS)
    negative_prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS, required=False, allow_blank=True, default=""
    )
    num_images = StrictIntegerField(min_value=1, max_value=settings.SDXL_MAX_NUM_IMAGES, default=1)
    height = _image_side(default=1024)
    width = _image_side(default=1024)
    guidance_scale = StrictFloatField(min_value=0.0, max_value=30.0, default=7.0)
    # Base stops at 0.8 of the schedule and the Refiner takes the rest: each needs a step.
    steps = StrictIntegerField(min_value=5, max_value=150, default=20)
    use_lora = serializers.BooleanField(default=False)
    session_id = SessionIdField(required=False, allow_null=True)
    iteration = StrictIntegerField(
        min_value=1, max_value=2**31 - 1, required=False, allow_null=True
    )
    lora_scale = StrictFloatField(min_value=-4.0, max_value=4.0, default=1.0)
    seed = StrictIntegerField(**_SEED)

    def validate(self, attrs):
        if attrs["use_lora"] and attrs.get("session_id") is None:
            raise serializers.ValidationError({"session_id": "is required when use_lora is true"})
        return attrs
