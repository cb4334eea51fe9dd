from django.conf import settings
from drf_spectacular.utils import PolymorphicProxySerializer
from rest_framework import serializers

from sdxl_service.fields import (
    Base64BytesField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
)
from training_app.generations import SEED_BITS
from training_app.models import TrainingRun
from training_app.services import LORA_FORMATS

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
    format = serializers.ChoiceField(
        choices=LORA_FORMATS,
        default=LORA_FORMATS[0],
        help_text="diffusers: the stored file; kohya: the same adapter for AUTOMATIC1111, "
        "ComfyUI and sd-scripts",
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


# --- Responses: what the OpenAPI description shows (the views build these bodies) -----


class TrainLoraResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["started"])
    run_id = serializers.IntegerField()


class TrainStatusInProgress(serializers.Serializer):
    status = serializers.ChoiceField(choices=["in-progress"])
    progress = serializers.IntegerField(min_value=0, max_value=99)
    queued = serializers.BooleanField(help_text="no worker has started the run yet")
    stage = serializers.ChoiceField(choices=TrainingRun.Stage.values)
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(allow_null=True)
    loss = serializers.FloatField(allow_null=True, help_text="of the last step")
    eta_seconds = serializers.IntegerField(
        allow_null=True, help_text="from the time per step so far; null before the first step"
    )


class TrainStatusCompleted(serializers.Serializer):
    status = serializers.ChoiceField(choices=["completed"])
    progress = serializers.ChoiceField(choices=[100])
    lora = serializers.CharField(allow_null=True, help_text="null once the file was pruned")


class TrainStatusError(serializers.Serializer):
    status = serializers.ChoiceField(choices=["error"])
    message = serializers.CharField(help_text='"training was cancelled" after /cancel_training')


class TrainStatusNone(serializers.Serializer):
    status = serializers.ChoiceField(choices=["none"])
    progress = serializers.ChoiceField(choices=[0])


def train_status_response(**kwargs) -> PolymorphicProxySerializer:
    """/train_status answers exactly one of API.md's four shapes."""
    return PolymorphicProxySerializer(
        component_name="TrainStatus",
        serializers=[
            TrainStatusInProgress,
            TrainStatusCompleted,
            TrainStatusError,
            TrainStatusNone,
        ],
        resource_type_field_name=None,
        **kwargs,
    )


class SessionSummary(serializers.Serializer):
    session_id = serializers.CharField()
    latest_lora = serializers.CharField(allow_null=True)
    image_groups = serializers.IntegerField()
    training = train_status_response()


class ListSessionsResponse(serializers.Serializer):
    sessions = SessionSummary(many=True)


class CancelTrainingResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["cancelled"])
    session_id = serializers.CharField()
    run_id = serializers.IntegerField()


class GetLoraResponse(serializers.Serializer):
    session_id = serializers.CharField()
    lora_filename = serializers.CharField()
    lora_base64 = serializers.CharField(help_text="the safetensors file, base64")
    iteration = serializers.IntegerField()
    format = serializers.ChoiceField(choices=LORA_FORMATS)
    sha256 = serializers.CharField(help_text="of the bytes in lora_base64")


class UploadLoraResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["success"])
    lora_filename = serializers.CharField()
    iteration = serializers.IntegerField()


class LoraUsed(serializers.Serializer):
    filename = serializers.CharField()
    sha256 = serializers.CharField()


class Txt2ImgResponse(serializers.Serializer):
    images_base64 = serializers.ListField(
        child=serializers.CharField(), help_text="num_images PNGs, parameters in their text chunks"
    )
    seed = serializers.IntegerField(help_text="the seed used: the same seed gives the same image")
    lora = LoraUsed(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)
