"""/txt2img's request body: one field for each of sdxl_engine's GenerationParams, their
defaults and limits, and the request-only fields (TXT2IMG_REQUEST_FIELDS)."""

from typing import Any

from django.conf import settings
from rest_framework import serializers

from sdxl_engine.parameters import (
    DEFAULT_FACE_PADDING,
    DEFAULT_FACE_STRENGTH,
    DEFAULT_HIRES_SCALE,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_HIRES_UPSCALER,
    DEFAULT_INPAINT_FILL,
    DEFAULT_INPAINT_PADDING,
    DEFAULT_LORA_SCALE,
    DEFAULT_MASK_BLUR,
    DEFAULT_MAX_FACES,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_QUALITY,
    DEFAULT_REFINER_POLICY,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STRENGTH,
    FACE_MASK_BLUR,
    GENERATION_DEFAULTS,
    HIRES_SCALE_MAX,
    HIRES_UPSCALERS,
    INPAINT_AREAS,
    INPAINT_FILLS,
    INPAINT_PADDING_MAX,
    MASK_BLUR_MAX,
    MAX_FACE_PADDING,
    MAX_FACES,
    MAX_LORAS,
    OUTPUT_FORMAT_ALIASES,
    OUTPUT_FORMATS,
    REFINER_POLICIES,
    REFINER_SWITCH_MAX,
    REFINER_SWITCH_MIN,
    GenerationParams,
    LoraChoice,
    Outpaint,
    canvas_problem,
    field_names,
    one_of,
)
from sdxl_engine.prompt_syntax import DEFAULT_PROMPT_SYNTAX, PROMPT_SYNTAXES
from sdxl_engine.schedulers import SCHEDULER_NAMES, SCHEDULERS
from sdxl_service.api import field_aliases
from sdxl_service.api.common import WebhookFields
from sdxl_service.api.fields import (
    SEED,
    Base64BytesField,
    ChoiceField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
    image_side,
)
from sdxl_service.api.loras.serializers import (
    ITERATION,
    lora_filename_field,
    one_way_to_name_a_lora,
)


class LoraChoiceSerializer(serializers.Serializer[Any]):
    """One entry of /txt2img's `loras`."""

    field_alias_context = field_aliases.LORA_ENTRY

    session_id = SessionIdField(help_text="the session whose LoRA this is (any session)")
    iteration = StrictIntegerField(**ITERATION)
    lora_filename = lora_filename_field()
    scale = StrictFloatField(
        min_value=-4.0,
        max_value=4.0,
        default=DEFAULT_LORA_SCALE,
        help_text="its strength, as in AUTOMATIC1111's <lora:name:scale>",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return one_way_to_name_a_lora(attrs)


class OutpaintSerializer(serializers.Serializer[Any]):
    """/txt2img's `outpaint`: the margins the canvas grows by around the init image."""

    left = StrictIntegerField(min_value=0, default=0, help_text="px, a multiple of 8")
    right = StrictIntegerField(min_value=0, default=0, help_text="px, a multiple of 8")
    top = StrictIntegerField(min_value=0, default=0, help_text="px, a multiple of 8")
    bottom = StrictIntegerField(min_value=0, default=0, help_text="px, a multiple of 8")


# --- face detail
class FaceDetailSerializer(serializers.Serializer[Any]):
    """/txt2img's `face_detail`: ADetailer's face pass, by its option names."""

    strength = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        default=DEFAULT_FACE_STRENGTH,
        help_text="how much of each face is redone, above 0 up to 1 (ADetailer's "
        f"ad_denoising_strength); default {DEFAULT_FACE_STRENGTH}",
    )
    prompt = StringField(
        max_length=settings.SDXL_MAX_PROMPT_CHARS,
        required=False,
        allow_blank=True,
        default="",
        help_text="the faces' own prompt (ADetailer's ad_prompt); empty: the request's prompt",
    )
    padding = StrictIntegerField(
        min_value=0,
        max_value=MAX_FACE_PADDING,
        default=DEFAULT_FACE_PADDING,
        help_text="pixels around each face (past its mask's feathered edge) redone with it as "
        "context (ADetailer's ad_inpaint_only_masked_padding); default "
        f"{DEFAULT_FACE_PADDING}",
    )
    max_faces = StrictIntegerField(
        min_value=1,
        max_value=MAX_FACES,
        default=DEFAULT_MAX_FACES,
        help_text="the most faces redone per image, the largest first (ADetailer's "
        f'"mask only top k" by area); default {DEFAULT_MAX_FACES}',
    )


class HiresFixSerializer(serializers.Serializer[Any]):
    """/txt2img's `hires`: AUTOMATIC1111's hires fix (enable_hr), its fields A1111's
    hr_scale, hr_upscaler, hr_second_pass_steps and denoising_strength."""

    scale = StrictFloatField(
        min_value=1.0,
        max_value=HIRES_SCALE_MAX,
        default=DEFAULT_HIRES_SCALE,
        help_text="AUTOMATIC1111's hr_scale: each side of the first pass (width x height) times "
        f"this, above 1 up to {HIRES_SCALE_MAX:g}, rounded down to a multiple of 8 (A1111's "
        f"int(side x scale), as its latents have it); left out: {DEFAULT_HIRES_SCALE:g}. The "
        "final size must be within SDXL_MAX_IMAGE_SIDE",
    )
    upscaler = ChoiceField(
        choices=[
            (
                "latent",
                "the first pass's latents, bilinear (AUTOMATIC1111's \"Latent\")",
            ),
            ("lanczos", "the first pass's images, Lanczos (AUTOMATIC1111's \"Lanczos\")"),
        ],
        # A1111's names for them, as its hr_upscaler takes them.
        aliases={name: key for key, name in HIRES_UPSCALERS.items()},
        default=DEFAULT_HIRES_UPSCALER,
        help_text="AUTOMATIC1111's hr_upscaler (its names Latent and Lanczos are taken too); "
        f"left out: {DEFAULT_HIRES_UPSCALER}",
    )
    steps = StrictIntegerField(
        min_value=0,
        max_value=150,
        required=False,
        allow_null=True,
        help_text="AUTOMATIC1111's hr_second_pass_steps: the schedule of the second pass, of "
        "which it runs the last denoising_strength; left out, null or 0: the request's steps",
    )
    denoising_strength = StrictFloatField(
        min_value=0.0,
        max_value=1.0,
        default=DEFAULT_HIRES_STRENGTH,
        help_text="AUTOMATIC1111's denoising_strength of the hires pass: the part of the "
        f"schedule run on the upscaled image, above 0 up to 1; left out: {DEFAULT_HIRES_STRENGTH} "
        "(A1111's UI default)",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # A1111's hr_second_pass_steps 0: the request's steps, as null here.
        if not attrs.get("steps"):
            attrs["steps"] = None
        return attrs


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
TXT2IMG_RENAMED = {"init_image_base64": "init_image", "mask_base64": "mask"}
_TXT2IMG_FIELD = {param: field for field, param in TXT2IMG_RENAMED.items()}


class Txt2ImgSerializer(WebhookFields):
    """/txt2img's body: one field for each of sdxl_engine's GenerationParams (a test holds
    them to the same names), their defaults and limits, and TXT2IMG_REQUEST_FIELDS."""

    field_alias_context = field_aliases.GENERATION

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
    height = image_side(
        required=False,
        allow_null=True,
        help_text="left out (or null): the model's native size (1024 for SDXL, 64 for the tiny "
        "model), capped at SDXL_MAX_IMAGE_SIDE; with init_image_base64, the image's aspect "
        "ratio at about the native area (each side the nearest multiple of 8)",
    )
    width = image_side(
        required=False,
        allow_null=True,
        help_text="left out (or null): as height",
    )
    guidance_scale = StrictFloatField(
        min_value=0.0, max_value=30.0, default=GENERATION_DEFAULTS.guidance_scale
    )
    # Base stops at refiner_switch (0.5 to 0.99) of the schedule and the Refiner takes the
    # rest: each needs a step.
    steps = StrictIntegerField(min_value=5, max_value=150, default=GENERATION_DEFAULTS.steps)
    use_lora = serializers.BooleanField(default=False)
    session_id = SessionIdField(required=False, allow_null=True)
    iteration = StrictIntegerField(**ITERATION)
    lora_filename = lora_filename_field()
    lora_scale = StrictFloatField(min_value=-4.0, max_value=4.0, default=DEFAULT_LORA_SCALE)
    seed = StrictIntegerField(**SEED)
    scheduler = ChoiceField(
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
    refiner = ChoiceField(
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
        "are), resized to width x height (left out: its own aspect ratio)",
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
    output_format = ChoiceField(
        choices=OUTPUT_FORMATS,
        aliases=OUTPUT_FORMAT_ALIASES,
        required=False,
        allow_null=True,
        help_text="the images' format (jpg is taken as jpeg); left out: "
        f"{DEFAULT_OUTPUT_FORMAT}. JPEG and WebP carry the parameters in EXIF UserComment as "
        "AUTOMATIC1111 writes them, PNG in its 'parameters' text chunk",
    )
    quality = StrictIntegerField(
        min_value=1,
        max_value=100,
        required=False,
        allow_null=True,
        help_text=f"jpeg and webp only; left out: {DEFAULT_QUALITY}",
    )

    # --- Inpainting and outpainting (AUTOMATIC1111's img2img API names where it has them)
    mask_base64 = Base64BytesField(
        required=False,
        allow_null=True,
        help_text="inpainting (A1111's `mask`): a PNG, JPEG, WebP or BMP mask, white where "
        "the init image is repainted, black where it is kept; the init image's aspect ratio "
        "(within 1%), resized to width x height. Needs init_image_base64; not with outpaint",
    )
    mask_blur = StrictIntegerField(
        min_value=0,
        max_value=MASK_BLUR_MAX,
        required=False,
        allow_null=True,
        help_text="px the mask's edge is blurred by (A1111's mask_blur); left out: "
        f"{DEFAULT_MASK_BLUR}. Only with mask_base64 or outpaint",
    )
    inpaint_area = ChoiceField(
        choices=[
            ("whole", "the whole image is inpainted at width x height"),
            (
                "masked",
                "only the mask's box plus inpaint_padding, at width x height, pasted back "
                "(A1111's inpaint_full_res, 'Only masked')",
            ),
        ],
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": one_of(INPAINT_AREAS)},
        help_text=f"left out: {INPAINT_AREAS[0]}. Only with mask_base64 or outpaint",
    )
    inpaint_padding = StrictIntegerField(
        min_value=0,
        max_value=INPAINT_PADDING_MAX,
        required=False,
        allow_null=True,
        help_text="px around the mask's box under inpaint_area masked (A1111's "
        f"inpaint_full_res_padding); left out: {DEFAULT_INPAINT_PADDING}. Only with "
        "mask_base64 or outpaint",
    )
    inpaint_fill = ChoiceField(
        choices=[
            ("fill", "the colours around the mask, blurred in (A1111's inpainting_fill 0)"),
            ("original", "the init image as it is (1)"),
            ("latent_noise", "random latents (2)"),
            ("latent_nothing", "zero latents (3)"),
        ],
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": one_of(INPAINT_FILLS)},
        help_text=f"what the masked area starts from (A1111's inpainting_fill, 'Masked "
        f"content'); left out: {DEFAULT_INPAINT_FILL}. Only with mask_base64 or outpaint",
    )
    outpaint = OutpaintSerializer(
        required=False,
        allow_null=True,
        help_text="outpainting: grow the canvas of init_image_base64 (sized as for img2img: "
        "width x height) by these margins in px (multiples of 8, one at least above 0), fill "
        "the new area from the image's edges and inpaint it with a blurred seam of mask_blur "
        "px into the image. The images are (width + left + right) x (height + top + bottom), "
        "each side at most SDXL_MAX_IMAGE_SIDE; width and height stay the image's. Needs "
        "init_image_base64; not with mask_base64",
    )

    # --- prompts (issue 28)
    prompt_syntax = ChoiceField(
        choices=[
            (
                "a1111",
                "AUTOMATIC1111's attention syntax: (word) x1.1, ((word)), [word] /1.1, "
                "(word:1.3), \\( \\) for literal brackets, BREAK starts a new 75-token chunk",
            ),
            (
                "plain",
                "the prompts as written, every character literal (A1111's emphasis 'None')",
            ),
        ],
        required=False,
        allow_null=True,
        error_messages={"invalid_choice": one_of(PROMPT_SYNTAXES)},
        help_text="how prompt and negative_prompt are read; left out (or null): "
        f"{DEFAULT_PROMPT_SYNTAX}. Either way prompts of any length are encoded in 75-token "
        "chunks, as AUTOMATIC1111 does",
    )

    # --- face detail
    face_detail = FaceDetailSerializer(
        required=False,
        allow_null=True,
        help_text="a face detail pass (AUTOMATIC1111's ADetailer): each face found in each "
        "image (OpenCV's frontal-face detector) is cropped with its padding, redone by "
        "img2img at the model's native size with the request's LoRAs, scheduler and Refiner, "
        f"and pasted back through its mask, blurred {FACE_MASK_BLUR} px (ad_mask_blur). "
        "The answer's faces_redone says how many faces each image had redone. Left out (or "
        "null): no face pass",
    )

    # --- hires
    hires = HiresFixSerializer(
        required=False,
        allow_null=True,
        help_text="AUTOMATIC1111's hires fix (enable_hr): the image is made at width x height, "
        "upscaled by scale and denoised again at the larger size (img2img at "
        "denoising_strength, with the request's prompts, seeds, scheduler, Refiner policy "
        "and LoRAs); the images have the larger size. Text-to-image only (not with "
        "init_image_base64). Left out (or null): no hires pass",
    )

    response_format = ChoiceField(
        choices=RESPONSE_FORMATS,
        default=RESPONSE_FORMATS[0],
        help_text="base64: the images in images_base64 (the original answer); url: only their "
        "image_urls, to GET (smaller answers)",
    )

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        fields = super().get_fields()
        # "async" is a Python keyword: it cannot be declared in the class body.
        fields["async"] = serializers.BooleanField(
            default=False,
            help_text="true: answer 202 at once with the generation's id and status_url "
            "instead of waiting for the images",
        )
        return fields

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
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
        attrs["mask"] = attrs.pop("mask_base64", None)
        if attrs.get("outpaint") is not None:
            attrs["outpaint"] = Outpaint(**attrs["outpaint"])
        attrs["webhook_events"] = tuple(attrs.get("webhook_events") or ())
        param_names = field_names(GenerationParams)
        params = GenerationParams(**{k: v for k, v in attrs.items() if k in param_names})
        problems = params.problems()
        if problems:
            name, problem = next(iter(problems.items()))
            raise serializers.ValidationError({_TXT2IMG_FIELD.get(name, name): problem})
        _canvas_check(params)
        return one_way_to_name_a_lora(attrs)


def _canvas_check(params: GenerationParams) -> None:
    """Outpainting's canvas within SDXL_MAX_IMAGE_SIDE when the size is given (a size left
    out is filled and checked again by the service, from the init image)."""
    if params.outpaint is None or params.width is None or params.height is None:
        return
    problem = canvas_problem(params.canvas_size, settings.SDXL_MAX_IMAGE_SIDE)
    if problem:
        raise serializers.ValidationError({"outpaint": problem})
