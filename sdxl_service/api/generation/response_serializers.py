"""What a generation used and made, as /txt2img answers it and GET /generations/<id>
shows it."""

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sdxl_engine.parameters import HIRES_UPSCALER_NAMES, OUTPUT_FORMATS, REFINER_POLICIES
from sdxl_engine.prompt_syntax import PROMPT_SYNTAXES


# Inline rather than a nullable reference: OpenAPI 3.0.3 ignores `nullable` beside a bare
# `allOf: [$ref]` (it applies only with a `type`), so strict validators and client
# generators would refuse the null a request without a LoRA answers.
@extend_schema_field(
    {
        "type": "object",
        "nullable": True,
        "properties": {
            "filename": {"type": "string", "description": "the LoRA file the Base used"},
            "sha256": {"type": "string", "description": "of that file"},
        },
        "required": ["filename", "sha256"],
        "description": "the LoRA applied, or null without one",
    }
)
class LoraUsed(serializers.Serializer[Any]):
    filename = serializers.CharField()
    sha256 = serializers.CharField()


class AppliedLoraItem(serializers.Serializer[Any]):
    session_id = serializers.CharField()
    filename = serializers.CharField()
    sha256 = serializers.CharField()
    scale = serializers.FloatField()


class GenerationUsed(serializers.Serializer[Any]):
    """What a generation used and made, in /txt2img's answer and GET /generations/<id>."""

    image_urls = serializers.ListField(
        child=serializers.CharField(),
        help_text="each image's URL (GET /generations/<id>/<i>.<ext>), with the API's access "
        "rules; empty until the generation is completed",
    )
    seed = serializers.IntegerField(help_text="the seed used: the same seed gives the same image")
    seeds = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="each image's own seed (seed, seed + 1, ...): a request for one image with "
        "seeds[i] gives image i again",
    )
    lora = LoraUsed(allow_null=True, help_text="the first (or only) LoRA applied")
    loras = AppliedLoraItem(many=True, help_text="every LoRA applied, in order")
    scheduler = serializers.CharField(allow_null=True, help_text="null: the model's own (Euler)")
    refiner = serializers.ChoiceField(choices=REFINER_POLICIES)
    refiner_switch = serializers.FloatField(
        allow_null=True, help_text="where the Refiner took over; null under refiner none"
    )
    strength = serializers.FloatField(allow_null=True, help_text="img2img's; null for txt2img")
    output_format = serializers.ChoiceField(choices=OUTPUT_FORMATS)
    # --- prompts (issue 28)
    prompt_syntax = serializers.ChoiceField(
        choices=PROMPT_SYNTAXES, help_text="how the prompts were read (a1111 when left out)"
    )
    duration_ms = serializers.IntegerField(allow_null=True)
    faces_redone = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text="per image, how many faces the face detail pass redid (0: none found, "
        "the image as first made); null without face_detail, and until completed",
    )


class FaceDetailUsed(serializers.Serializer[Any]):
    """The face detail pass a generation asked for, its defaults filled."""

    strength = serializers.FloatField()
    prompt = serializers.CharField(help_text="empty: the request's prompt")
    padding = serializers.IntegerField()
    max_faces = serializers.IntegerField()


class HiresFixRecord(serializers.Serializer[Any]):
    """A generation's hires fix as its row records it: every field, steps null for the
    request's steps."""

    scale = serializers.FloatField()
    upscaler = serializers.ChoiceField(choices=HIRES_UPSCALER_NAMES)
    steps = serializers.IntegerField(allow_null=True)
    denoising_strength = serializers.FloatField()


class GenerationParameters(serializers.Serializer[Any]):
    """The parameters a generation ran with, as its row records them (GET /generations/<id>'s
    `parameters`): every field with a default, width and height filled when left out; the
    optional ones only when given (their defaults are the answer's top-level keys)."""

    num_images = serializers.IntegerField()
    width = serializers.IntegerField(
        help_text="as rendered: left out, the model's native size (or the init image's aspect)"
    )
    height = serializers.IntegerField(help_text="as width")
    steps = serializers.IntegerField()
    guidance_scale = serializers.FloatField()
    scheduler = serializers.CharField(required=False)
    refiner = serializers.CharField(required=False)
    refiner_switch = serializers.FloatField(required=False)
    strength = serializers.FloatField(required=False)
    output_format = serializers.CharField(required=False)
    quality = serializers.IntegerField(required=False)
    # Inpainting and outpainting: all four filled (as they ran) with a mask or outpaint.
    mask_blur = serializers.IntegerField(required=False)
    inpaint_area = serializers.CharField(required=False)
    inpaint_padding = serializers.IntegerField(required=False)
    inpaint_fill = serializers.CharField(required=False)
    outpaint = serializers.DictField(
        child=serializers.IntegerField(),
        required=False,
        help_text="the margins; the images are (width + left + right) x (height + top + "
        "bottom), width and height being the init image's size in them",
    )
    # --- prompts (issue 28)
    prompt_syntax = serializers.CharField(required=False)
    face_detail = FaceDetailUsed(required=False)
    hires = HiresFixRecord(required=False, help_text="the hires fix, when asked for")


class Txt2ImgResponse(GenerationUsed):
    parameters = GenerationParameters(
        help_text="the parameters it ran with (size, steps, guidance...), as GET "
        "/generations/<id> shows them"
    )
    images_base64 = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="num_images images in output_format (PNG by default), the parameters in them "
        'as AUTOMATIC1111 writes them; left out with response_format "url"',
    )
    generation_id = serializers.IntegerField(help_text="for GET /generations/<id>")


class GenerationQueuePlace(serializers.Serializer[Any]):
    """A queued generation's place in the generation queue; null once a worker took it."""

    queue_position = serializers.IntegerField(
        allow_null=True,
        min_value=1,
        help_text="1: the next request a generation worker takes (with the queued ones that "
        "can share its batch); null unless queued",
    )
    waiting_for = serializers.DictField(
        allow_null=True,
        help_text='what it waits for: {"generation_id": N}, the request just ahead of it; '
        'for the next one, the running batch: {"generation_id": N, "batch": [ids]}; '
        '{"worker": "generation"} when nothing is ahead but no generation worker runs; '
        "null when not queued or a worker takes it now",
    )
    queue_eta_seconds = serializers.IntegerField(
        allow_null=True,
        help_text="estimated seconds until a worker takes it: the images ahead at the recent "
        "time per image, over the live generation workers; null when unknown",
    )


class Txt2ImgQueuedResponse(GenerationQueuePlace):
    generation_id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["queued"])
    status_url = serializers.CharField(help_text="GET it for the status, then the image_urls")


class GenerationStatusResponse(GenerationUsed, GenerationQueuePlace):
    generation_id = serializers.IntegerField()
    status = serializers.ChoiceField(
        choices=["queued", "running", "completed", "error", "abandoned", "cancelled"],
        help_text="abandoned: a synchronous caller stopped waiting before a worker took it; "
        "cancelled: stopped before it finished (POST /generations/<id>/cancel, or its "
        "synchronous caller disconnected or was answered 504), no images",
    )
    message = serializers.CharField(allow_null=True, help_text="why, under error or cancelled")
    step = serializers.IntegerField(help_text="denoising steps done, Base and Refiner together")
    total_steps = serializers.IntegerField(allow_null=True)
    prompt = serializers.CharField()
    negative_prompt = serializers.CharField(allow_blank=True)
    parameters = serializers.DictField(help_text="the request's generation parameters")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
