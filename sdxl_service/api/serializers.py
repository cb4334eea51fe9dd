"""Every request and response body of the API (docs/api.md).

Requests are validated by their serializer; responses are rendered through theirs, so the
OpenAPI description at /api/schema is built from the same classes that shape the bodies.
Field names and defaults of training and generation come from sdxl_engine.parameters, the
definitions the workers run.
"""

from django.conf import settings
from django.core.validators import StepValueValidator
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers
from rest_framework.fields import SkipField

from sdxl_engine.parameters import (
    DEFAULT_LORA_SCALE,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_QUALITY,
    DEFAULT_REFINER_POLICY,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STRENGTH,
    GENERATION_DEFAULTS,
    LR_SCHEDULERS,
    MAX_LORAS,
    OUTPUT_FORMATS,
    RECIPES,
    REFINER_POLICIES,
    REFINER_SWITCH_MAX,
    REFINER_SWITCH_MIN,
    SEED_BITS,
    SERVICE_RECIPE,
    TRAINING_RESOLUTION_MULTIPLE,
    GenerationParams,
    LoraChoice,
    field_names,
    lr_warmup_problem,
    one_of,
    recipe_defaults,
    recipe_of,
)
from sdxl_engine.schedulers import SCHEDULER_NAMES, SCHEDULERS
from sdxl_service.api.fields import (
    Base64BytesField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
)
from training_app.models import TrainingRun
from training_app.services.loras import LORA_FORMATS
from training_app.services.webhooks import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS

# At most this many sample prompts: each is rendered at every sample step.
MAX_SAMPLE_PROMPTS = 8
_SEED = {"min_value": 0, "max_value": 2**SEED_BITS - 1, "required": False, "allow_null": True}
_ITERATION = {"min_value": 1, "max_value": 2**31 - 1, "required": False, "allow_null": True}


class MultipleOf(StepValueValidator):
    """Django's StepValueValidator with the API's message; the schema shows it as
    `multipleOf` (schema.AutoSchema)."""

    message = "must be a multiple of %(limit_value)s"


def largest_image_side(divisor: int) -> int:
    """The largest side a request may give: SDXL_MAX_IMAGE_SIDE rounded down to a multiple
    of `divisor` (with SDXL_MAX_IMAGE_SIDE 100, height 100 is refused: 96 is the largest)."""
    return settings.SDXL_MAX_IMAGE_SIDE // divisor * divisor


def _image_side(divisor: int = 8, **kwargs) -> serializers.IntegerField:
    return StrictIntegerField(
        min_value=64,
        max_value=largest_image_side(divisor),
        validators=[MultipleOf(divisor)],
        **kwargs,
    )


def default_image_side(side: int) -> int:
    """A generation's height or width when the request leaves it out: SDXL's native `side`
    (1024), capped at the largest side the service allows. Capped rather than refused: the
    operator set the limit, and a user who asks for "an image" expects the largest one the
    service makes, not an error about a field they never sent."""
    return min(side, largest_image_side(8))


# --- Requests --------------------------------------------------------------------------


class SessionRefSerializer(serializers.Serializer):
    session_id = SessionIdField()


class PostSessionImageSerializer(serializers.Serializer):
    session_id = SessionIdField()
    image_base64 = Base64BytesField()
    # May be empty: such an image trains with /train_lora's trigger as its whole caption.
    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS, allow_blank=True)


class WebhookFields(serializers.Serializer):
    """Where a job posts its events (docs/api.md: Webhooks)."""

    webhook_url = StringField(
        max_length=2000,
        required=False,
        allow_null=True,
        help_text="an http(s) URL on a host the operator allows (SDXL_WEBHOOK_ALLOWED_HOSTS) "
        "that gets each event as a signed JSON POST",
    )
    webhook_events = serializers.ListField(
        child=serializers.ChoiceField(choices=WEBHOOK_EVENTS),
        required=False,
        help_text=f"which events to post; left out (or empty): {', '.join(DEFAULT_WEBHOOK_EVENTS)}",
    )

    @staticmethod
    def webhook(validated: dict) -> dict:
        return {
            "webhook_url": validated.get("webhook_url"),
            "webhook_events": validated.get("webhook_events"),
        }


class TrainLoraSerializer(WebhookFields):
    """`session_id` and the optional training parameters of /train_lora.

    A field left out comes from the run's recipe: the service's (SERVICE_RECIPE) unless
    the body sets `steps` or `epochs`, which keeps the original's defaults.
    """

    # One field for each of sdxl_engine's TrainingParams: a test holds them to the same names.
    session_id = SessionIdField()
    recipe = serializers.ChoiceField(
        choices=RECIPES,
        required=False,
        help_text="where the fields left out come from: service (default without steps or "
        "epochs: rank 32, lr 1e-4, batch 4, warm-up, Min-SNR 5, caption dropout 0.05, "
        "aspect buckets, 1500-4000 image-views by image count) or original (default with "
        "steps or epochs: rank 4, lr 1e-4, batch 4, one epoch, square crops)",
    )
    steps = StrictIntegerField(
        min_value=1, max_value=settings.SDXL_MAX_TRAINING_STEPS, required=False
    )
    epochs = StrictIntegerField(min_value=1, max_value=1000, required=False)
    batch_size = StrictIntegerField(min_value=1, max_value=64, required=False)
    learning_rate = StrictFloatField(min_value=1e-7, max_value=0.1, required=False)
    rank = StrictIntegerField(min_value=1, max_value=128, required=False)
    resolution = _image_side(TRAINING_RESOLUTION_MULTIPLE, required=False)
    seed = StrictIntegerField(**_SEED)
    lr_scheduler = serializers.ChoiceField(
        choices=LR_SCHEDULERS,
        required=False,
        help_text=f"learning-rate schedule (service recipe: {SERVICE_RECIPE.lr_scheduler}; "
        "original: constant)",
    )
    lr_warmup_steps = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="steps of linear warm-up from 0; needs constant_with_warmup or cosine",
    )
    min_snr_gamma = StrictFloatField(
        min_value=0.0,
        max_value=100.0,
        required=False,
        help_text="Min-SNR loss weighting: min(SNR, gamma) / SNR per step (the Min-SNR paper "
        "uses 5); 0: off",
    )
    noise_offset = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        help_text="noise offset: adds this times a per-image, per-channel draw to the noise, "
        "so the LoRA can learn overall brightness (e.g. 0.05); 0: off",
    )

    trigger = StringField(
        max_length=100,
        required=False,
        allow_null=True,
        help_text='identity token, e.g. "sks" or "ohwx woman": put before every caption '
        "that lacks it; an image uploaded with an empty caption trains with it alone",
    )
    caption_dropout = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        help_text="probability that a sample trains with an empty caption (e.g. 0.05); 0: off",
    )
    train_text_encoder = serializers.BooleanField(
        required=False,
        help_text="also train a LoRA on both text encoders' attention (default false); "
        "stock diffusers' load_lora_weights, the kohya export and /txt2img all apply it",
    )
    text_encoder_lr = StrictFloatField(
        min_value=1e-7,
        max_value=0.1,
        required=False,
        help_text="the text encoders' learning rate with train_text_encoder (default: "
        "learning_rate, as kohya's --text_encoder_lr; their guides use about 1e-5 to 5e-5)",
    )
    sample_every = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="render sample images every this many steps, listed by /train_status "
        "(service recipe: four times a run; original: 0, never)",
    )
    sample_prompts = serializers.ListField(
        child=StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS),
        min_length=1,
        max_length=MAX_SAMPLE_PROMPTS,
        required=False,
        help_text="the samples' prompts (default: the trigger alone, then the first captions)",
    )
    sample_seed = StrictIntegerField(
        **_SEED, help_text="the samples' seed, the same at every sample step (default: the run's)"
    )
    checkpoint_every = StrictIntegerField(
        min_value=0,
        max_value=settings.SDXL_MAX_TRAINING_STEPS,
        required=False,
        help_text="save a checkpoint every this many steps: a LoRA file of the session, and "
        "what a run whose worker was lost resumes from (service recipe: four times a run; "
        "original: 0, never)",
    )
    enable_bucket = serializers.BooleanField(
        required=False,
        help_text="aspect-ratio buckets: each image trains at the SDXL size nearest its aspect "
        "ratio (service recipe: true); false: a centred square crop (original)",
    )

    def validate(self, attrs):
        if "steps" in attrs and "epochs" in attrs:
            raise serializers.ValidationError("give steps or epochs, not both")
        if "text_encoder_lr" in attrs and not attrs.get("train_text_encoder"):
            raise serializers.ValidationError(
                {
                    "text_encoder_lr": "needs train_text_encoder true (the text encoders train "
                    "only then)"
                }
            )
        # Only a warm-up the caller gave can clash: the recipes fit theirs to the schedule.
        defaults = recipe_defaults(recipe_of(attrs))
        warmup_problem = lr_warmup_problem(
            attrs.get("lr_scheduler", defaults.lr_scheduler), attrs.get("lr_warmup_steps", 0)
        )
        if warmup_problem:
            raise serializers.ValidationError({"lr_warmup_steps": warmup_problem})
        return attrs

    @staticmethod
    def training_parameters(validated: dict) -> dict:
        """The parameters the caller gave; the run fills the rest from its recipe."""
        return {
            k: v
            for k, v in validated.items()
            if k not in ("session_id", "webhook_url", "webhook_events") and v is not None
        }


def _lora_filename_field() -> serializers.CharField:
    return StringField(
        max_length=255,
        required=False,
        allow_null=True,
        help_text="any LoRA file of the session by name, a run's checkpoint "
        "(lora_run<run>_step<step>.safetensors) included; instead of iteration",
    )


def _one_way_to_name_a_lora(attrs: dict) -> dict:
    if attrs.get("iteration") is not None and attrs.get("lora_filename") is not None:
        raise serializers.ValidationError("give iteration or lora_filename, not both")
    return attrs


class GetLoraSerializer(serializers.Serializer):
    session_id = SessionIdField()
    iteration = StrictIntegerField(**_ITERATION)
    lora_filename = _lora_filename_field()
    format = serializers.ChoiceField(
        choices=LORA_FORMATS,
        default=LORA_FORMATS[0],
        help_text="diffusers: the stored file; kohya: the same adapter for AUTOMATIC1111, "
        "ComfyUI and sd-scripts",
    )

    def validate(self, attrs):
        return _one_way_to_name_a_lora(attrs)


class SessionImagesUploadSerializer(serializers.Serializer):
    """POST /sessions/<id>/images, multipart/form-data."""

    image = serializers.ListField(
        child=serializers.FileField(),
        required=False,
        help_text="image files (PNG, JPEG, WebP, BMP), as many as you like: `-F image=@a.jpg "
        "-F image=@b.jpg`",
    )
    caption = serializers.ListField(
        child=serializers.CharField(
            max_length=settings.SDXL_MAX_PROMPT_CHARS, allow_blank=True, trim_whitespace=False
        ),
        required=False,
        help_text="one caption per image, in the same order; none: every caption empty (the "
        "training trigger alone)",
    )
    archive = serializers.FileField(
        required=False,
        help_text="a zip of images, each with its caption in a .txt of the same name beside it "
        "(kohya's dataset layout); an image without one has an empty caption",
    )


class UploadLoraFileSerializer(serializers.Serializer):
    """/upload_lora as multipart/form-data: the file itself instead of base64."""

    session_id = SessionIdField()
    lora = serializers.FileField(help_text="the .safetensors file: `-F lora=@my_lora.safetensors`")
    filename = StringField(max_length=200, required=False, allow_null=True)


class UploadLoraSerializer(serializers.Serializer):
    session_id = SessionIdField()
    lora_base64 = Base64BytesField(
        help_text="a .safetensors LoRA or LoCon (any Linear or Conv2d module of the Base UNet "
        "and both text encoders) in diffusers, PEFT or kohya/LyCORIS form; LoHa, LoKr, DoRA "
        "and other adapter kinds are refused"
    )
    filename = StringField(max_length=200, required=False, allow_null=True)


class LoraChoiceSerializer(serializers.Serializer):
    """One entry of /txt2img's `loras`."""

    session_id = SessionIdField(help_text="the session whose LoRA this is (any session)")
    iteration = StrictIntegerField(**_ITERATION)
    lora_filename = _lora_filename_field()
    scale = StrictFloatField(
        min_value=-4.0,
        max_value=4.0,
        default=DEFAULT_LORA_SCALE,
        help_text="its strength, as in AUTOMATIC1111's <lora:name:scale>",
    )

    def validate(self, attrs):
        return _one_way_to_name_a_lora(attrs)


# How /txt2img answers its images: inline (the original) or as URLs to GET.
RESPONSE_FORMATS = ("base64", "url")
# The fields of /txt2img that are not GenerationParams, and why: the use_lora shorthand
# for one LoRA (GenerationRequest.params puts it into loras), how to answer, and where to
# post the events; init_image_base64 is the params' init_image, base64-encoded.
TXT2IMG_REQUEST_FIELDS = (
    "use_lora",
    "session_id",
    "iteration",
    "lora_filename",
    "lora_scale",
    "response_format",
    "async",
    "webhook_url",
    "webhook_events",
)
TXT2IMG_RENAMED = {"init_image_base64": "init_image"}
_TXT2IMG_FIELD = {param: field for field, param in TXT2IMG_RENAMED.items()}


class Txt2ImgSerializer(WebhookFields):
    """/txt2img's body: one field for each of sdxl_engine's GenerationParams (a test holds
    them to the same names), their defaults and limits, and TXT2IMG_REQUEST_FIELDS."""

    prompt = StringField(max_length=settings.SDXL_MAX_PROMPT_CHARS)
    negative_prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        required=False,
        allow_blank=True,
        default=GENERATION_DEFAULTS.negative_prompt,
    )
    num_images = StrictIntegerField(
        min_value=1, max_value=settings.SDXL_MAX_NUM_IMAGES, default=GENERATION_DEFAULTS.num_images
    )
    height = _image_side(default=default_image_side(GENERATION_DEFAULTS.height))
    width = _image_side(default=default_image_side(GENERATION_DEFAULTS.width))
    guidance_scale = StrictFloatField(
        min_value=0.0, max_value=30.0, default=GENERATION_DEFAULTS.guidance_scale
    )
    # Base stops at refiner_switch (0.5 to 0.99) of the schedule and the Refiner takes the
    # rest: each needs a step.
    steps = StrictIntegerField(min_value=5, max_value=150, default=GENERATION_DEFAULTS.steps)
    use_lora = serializers.BooleanField(default=False)
    session_id = SessionIdField(required=False, allow_null=True)
    iteration = StrictIntegerField(**_ITERATION)
    lora_filename = _lora_filename_field()
    lora_scale = StrictFloatField(min_value=-4.0, max_value=4.0, default=DEFAULT_LORA_SCALE)
    seed = StrictIntegerField(**_SEED)
    scheduler = serializers.ChoiceField(
        # Labelled with AUTOMATIC1111's names: the schema lists each as "`name` - label".
        choices=[
            (name, f"{spec.a1111_name} in AUTOMATIC1111") for name, spec in SCHEDULERS.items()
        ],
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": one_of(SCHEDULER_NAMES)},
        help_text="the sampler of both Base and Refiner; left out (or null): the model's own "
        "(Euler for SDXL)",
    )
    refiner = serializers.ChoiceField(
        choices=[
            (
                "ensemble",
                "the Base denoises the first refiner_switch of the schedule, the "
                "Refiner the rest (SDXL's ensemble of experts)",
            ),
            ("none", "the Base alone runs the whole schedule; the Refiner is not used"),
        ],
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": one_of(REFINER_POLICIES)},
        help_text=f"how the Refiner takes part; left out (or null): {DEFAULT_REFINER_POLICY}",
    )
    refiner_switch = StrictFloatField(
        min_value=REFINER_SWITCH_MIN,
        max_value=REFINER_SWITCH_MAX,
        required=False,
        allow_null=True,
        help_text=f"the fraction of the schedule the Base denoises under refiner ensemble; left "
        f"out (or null): {DEFAULT_REFINER_SWITCH}. Not with refiner none",
    )

    loras = serializers.ListField(
        child=LoraChoiceSerializer(),
        required=False,
        max_length=MAX_LORAS,
        help_text=f"up to {MAX_LORAS} LoRAs of any sessions, applied together to the Base "
        "(UNet and text encoders) at their scales for this request; each names its LoRA by "
        "iteration or lora_filename, else the session's latest. Not with use_lora",
    )
    init_image_base64 = Base64BytesField(
        required=False,
        allow_null=True,
        help_text="img2img: a PNG, JPEG, WebP or BMP image to start from (checked as uploads "
        "are), resized to width x height",
    )
    strength = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        required=False,
        allow_null=True,
        help_text="img2img's denoising strength: the part of the schedule run on the noised "
        "image, above 0 up to 1 (at 1 the image is not used: text-to-image). Left out: "
        f"{DEFAULT_STRENGTH}. Only with init_image_base64",
    )
    output_format = serializers.ChoiceField(
        choices=OUTPUT_FORMATS,
        required=False,
        allow_null=True,
        help_text=f"the images' format; left out: {DEFAULT_OUTPUT_FORMAT}. JPEG and WebP carry "
        "the parameters in EXIF UserComment as AUTOMATIC1111 writes them, PNG in its "
        "'parameters' text chunk",
    )
    quality = StrictIntegerField(
        min_value=1,
        max_value=100,
        required=False,
        allow_null=True,
        help_text=f"jpeg and webp only; left out: {DEFAULT_QUALITY}",
    )

    response_format = serializers.ChoiceField(
        choices=RESPONSE_FORMATS,
        default=RESPONSE_FORMATS[0],
        help_text="base64: the images in images_base64 (the original answer); url: only their "
        "image_urls, to GET (smaller answers)",
    )

    def get_fields(self):
        fields = super().get_fields()
        # "async" is a Python keyword: it cannot be declared in the class body.
        fields["async"] = serializers.BooleanField(
            default=False,
            help_text="true: answer 202 at once with the generation's id and status_url "
            "instead of waiting for the images",
        )
        return fields

    def validate(self, attrs):
        """The body as a GenerationRequest's fields (LoRA choices, the image's bytes as
        init_image), once the request's shape and its params' problems() allow it. Only
        the first problem is answered."""
        if attrs["use_lora"] and attrs.get("session_id") is None:
            raise serializers.ValidationError({"session_id": "is required when use_lora is true"})
        if attrs["use_lora"] and attrs.get("loras"):
            raise serializers.ValidationError(
                {"loras": "give use_lora (one LoRA) or loras, not both"}
            )
        attrs["loras"] = tuple(LoraChoice(**choice) for choice in attrs.get("loras", ()))
        attrs["init_image"] = attrs.pop("init_image_base64", None)
        attrs["webhook_events"] = tuple(attrs.get("webhook_events") or ())
        param_names = field_names(GenerationParams)
        params = GenerationParams(**{k: v for k, v in attrs.items() if k in param_names})
        problems = params.problems()
        if problems:
            name, problem = next(iter(problems.items()))
            raise serializers.ValidationError({_TXT2IMG_FIELD.get(name, name): problem})
        return _one_way_to_name_a_lora(attrs)


# --- Responses -------------------------------------------------------------------------


class CreateSessionResponse(serializers.Serializer):
    session_id = serializers.IntegerField()


class SuccessResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["success"])


class DeleteSessionResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["deleted"])
    session_id = serializers.CharField()


class TrainLoraResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["started"])
    run_id = serializers.IntegerField()


class TrainingSampleItem(serializers.Serializer):
    step = serializers.IntegerField()
    prompt = serializers.CharField()
    url = serializers.CharField(help_text="the PNG, with the API's access rules")


class TrainingCheckpointItem(serializers.Serializer):
    step = serializers.IntegerField()
    lora_filename = serializers.CharField(help_text="for /get_lora and /txt2img's lora_filename")


class KeptAlongTheWay(serializers.Serializer):
    """What in-progress and completed runs list (sample_every, checkpoint_every)."""

    samples = TrainingSampleItem(many=True)
    checkpoints = TrainingCheckpointItem(many=True)
    resumed_from_step = serializers.IntegerField(
        allow_null=True,
        help_text="the checkpoint's step this run continued from after its worker was lost",
    )


class TrainStatusInProgress(KeptAlongTheWay):
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


class TrainStatusCompleted(KeptAlongTheWay):
    status = serializers.ChoiceField(choices=["completed"])
    progress = serializers.ChoiceField(choices=[100])
    lora = serializers.CharField(allow_null=True, help_text="null once the file was pruned")


class TrainStatusError(serializers.Serializer):
    status = serializers.ChoiceField(choices=["error"])
    message = serializers.CharField(help_text='"training was cancelled" after /cancel_training')


class TrainStatusNone(serializers.Serializer):
    status = serializers.ChoiceField(choices=["none"])
    progress = serializers.ChoiceField(choices=[0])


# /train_status answers exactly one of the four shapes, chosen by its "status".
_TRAIN_STATUS_SHAPES = {
    "in-progress": TrainStatusInProgress,
    "completed": TrainStatusCompleted,
    "error": TrainStatusError,
    "none": TrainStatusNone,
}
TRAIN_STATUS_SCHEMA = PolymorphicProxySerializer(
    component_name="TrainStatus",
    serializers=list(_TRAIN_STATUS_SHAPES.values()),
    resource_type_field_name=None,
)


@extend_schema_field(TRAIN_STATUS_SCHEMA)
class TrainStatusField(serializers.Field):
    """A training status body, rendered through the serializer of its shape."""

    def to_representation(self, body: dict) -> dict:
        return _TRAIN_STATUS_SHAPES[body["status"]](body).data


class TrainStatusResponse(serializers.BaseSerializer):
    """/train_status's body: TrainStatusField's rendering, at the top level."""

    def to_representation(self, body: dict) -> dict:
        return TrainStatusField().to_representation(body)


class SessionSummary(serializers.Serializer):
    session_id = serializers.CharField()
    latest_lora = serializers.CharField(allow_null=True)
    image_groups = serializers.IntegerField()
    training = TrainStatusField()


class ListSessionsQuery(serializers.Serializer):
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

    def get_attribute(self, instance):
        if self.field_name not in instance:
            raise SkipField()
        return super().get_attribute(instance)


class ListSessionsResponse(serializers.Serializer):
    sessions = SessionSummary(many=True)
    count = serializers.IntegerField(
        required=False, help_text="with limit or offset: how many sessions there are in all"
    )
    next_offset = _OnlyWhenPaging(
        required=False,
        allow_null=True,
        help_text="with limit or offset: the offset of the next page; null after the last",
    )


class SessionImageItem(serializers.Serializer):
    image_id = serializers.IntegerField()
    group = serializers.IntegerField(help_text="the upload group's number (its folder)")
    url = serializers.CharField(help_text="the image file, with the API's access rules")
    caption = serializers.CharField(allow_blank=True)
    format = serializers.CharField()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    size = serializers.IntegerField(help_text="bytes")


class SessionLoraItem(serializers.Serializer):
    lora_filename = serializers.CharField()
    iteration = serializers.IntegerField()
    sha256 = serializers.CharField()
    size = serializers.IntegerField(help_text="bytes")
    source = serializers.ChoiceField(choices=["trained", "uploaded", "found"])
    run_id = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class SessionCheckpointItem(serializers.Serializer):
    lora_filename = serializers.CharField()
    run_id = serializers.IntegerField()
    step = serializers.IntegerField()
    sha256 = serializers.CharField()


class SessionRunItem(serializers.Serializer):
    run_id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=TrainingRun.Status.values)
    stage = serializers.ChoiceField(choices=TrainingRun.Stage.values)
    step = serializers.IntegerField()
    total_steps = serializers.IntegerField(allow_null=True)
    parameters = serializers.DictField()
    message = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)


class SessionGenerationItem(serializers.Serializer):
    generation_id = serializers.IntegerField()
    status = serializers.CharField()
    prompt = serializers.CharField()
    created_at = serializers.DateTimeField()
    status_url = serializers.CharField()


class SessionImagesUploadResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["success"])
    images = SessionImageItem(many=True, help_text="what was stored, in order")


class SessionDetailResponse(serializers.Serializer):
    session_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    images = SessionImageItem(many=True)
    loras = SessionLoraItem(many=True)
    checkpoints = SessionCheckpointItem(many=True)
    runs = SessionRunItem(many=True, help_text="oldest first")
    recent_generations = SessionGenerationItem(
        many=True, help_text="the newest 20 that applied one of the session's LoRAs"
    )


class CancelTrainingResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["cancelled"])
    session_id = serializers.CharField()
    run_id = serializers.IntegerField()


class GetLoraResponse(serializers.Serializer):
    session_id = serializers.CharField()
    lora_filename = serializers.CharField()
    lora_base64 = serializers.CharField(help_text="the safetensors file, base64")
    iteration = serializers.IntegerField(allow_null=True, help_text="null for a checkpoint")
    format = serializers.ChoiceField(choices=LORA_FORMATS)
    sha256 = serializers.CharField(help_text="of the bytes in lora_base64")


class UploadLoraResponse(serializers.Serializer):
    status = serializers.ChoiceField(choices=["success"])
    lora_filename = serializers.CharField()
    iteration = serializers.IntegerField()


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
class LoraUsed(serializers.Serializer):
    filename = serializers.CharField()
    sha256 = serializers.CharField()


class AppliedLoraItem(serializers.Serializer):
    session_id = serializers.CharField()
    filename = serializers.CharField()
    sha256 = serializers.CharField()
    scale = serializers.FloatField()


class GenerationUsed(serializers.Serializer):
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
    duration_ms = serializers.IntegerField(allow_null=True)


class Txt2ImgResponse(GenerationUsed):
    images_base64 = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="num_images images in output_format (PNG by default), the parameters in them "
        'as AUTOMATIC1111 writes them; left out with response_format "url"',
    )
    generation_id = serializers.IntegerField(help_text="for GET /generations/<id>")


class Txt2ImgQueuedResponse(serializers.Serializer):
    generation_id = serializers.IntegerField()
    status = serializers.ChoiceField(choices=["queued"])
    status_url = serializers.CharField(help_text="GET it for the status, then the image_urls")


class GenerationStatusResponse(GenerationUsed):
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


# --- Health ------------------------------------------------------------------------------


class HealthCheckItem(serializers.Serializer):
    ok = serializers.BooleanField()
    reason = serializers.CharField(help_text="why, for a person; names no secret")


class HealthChecks(serializers.Serializer):
    database = HealthCheckItem(help_text="the database answers a query")
    broker = HealthCheckItem(
        help_text="django-q2's broker (the ORM broker in the database, or Redis) is reachable"
    )
    generation_worker = HealthCheckItem(
        help_text="a generation worker's heartbeat is fresh (SDXL_WORKER_STALE_AFTER)"
    )
    training_worker = HealthCheckItem(
        help_text="a training worker's heartbeat is fresh (SDXL_WORKER_STALE_AFTER)"
    )


class HealthResponse(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=[
            ("ok", "everything is fine"),
            ("degraded", "database and broker are fine, a worker is missing (HTTP 200)"),
            ("down", "the database or the broker fails (HTTP 503)"),
        ]
    )
    checks = HealthChecks()
