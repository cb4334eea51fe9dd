"""The names other tools give the request fields, and what a refusal of an unknown field
says: the field meant, from this table or by a close spelling.

Users of AUTOMATIC1111 (/sdapi/v1/txt2img), ComfyUI (its nodes' inputs), diffusers (the
pipelines' arguments and training scripts' flags), Replicate's cog-sdxl (predict.py and
train.py inputs), kohya's sd-scripts (train_network.py's flags), ai-toolkit and OneTrainer
(their config keys) send the names they know. The API answers 400 for any field it does
not know (sdxl_service.api.common.validated); this table turns `cfg_scale` into `did you
mean "guidance_scale"?`, and says what to do instead where a name has no counterpart here.
docs/api.md ("Unknown fields and names from other tools") shows the same table.

Plain data and functions: no Django, no DRF.
"""

import difflib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field

# Which request a name is mapped for: a request serializer names its own (its
# `field_alias_context`); one that names none gets every mapping whose field it has.
TRAINING = "training"  # /train_lora
GENERATION = "generation"  # /txt2img
LORA_ENTRY = "lora entry"  # an entry of /txt2img's loras
IMAGE = "image"  # /post_session_image
IMAGE_FILES = "image files"  # POST /sessions/<id>/images (multipart), a caption edit
LORA_FILE = "lora file"  # /get_lora, /upload_lora
CONTEXTS = (TRAINING, GENERATION, LORA_ENTRY, IMAGE, IMAGE_FILES, LORA_FILE)

A1111 = "AUTOMATIC1111"
COMFY = "ComfyUI"
DIFFUSERS = "diffusers"
COG = "cog-sdxl"
KOHYA = "kohya"
AI_TOOLKIT = "ai-toolkit"
ONETRAINER = "OneTrainer"


@dataclass(frozen=True)
class Alias:
    """A name another tool uses (`name`, by `tools`) and this API's field for it in each
    context where it has one (`ours`); `note` says more (values, or what to do where
    nothing here matches)."""

    name: str
    tools: tuple[str, ...]
    ours: dict[str, str] = field(default_factory=dict)
    note: str = ""


_SCHEDULER_NOTE = (
    "it takes this service's names: euler, euler_a, dpmpp_2m, dpmpp_2m_karras, "
    "dpmpp_sde_karras, ddim, unipc (AUTOMATIC1111's Euler, Euler a, DPM++ 2M, ...)"
)
_MODEL_NOTE = "the model is the operator's (SDXL_MODEL_PRESET / SDXL_MODEL_ID); no request picks it"
_PRIOR_NOTE = (
    "no class images: prior_preservation_weight keeps the base model's own prediction for "
    "class_prompt"
)
_IMAGES_NOTE = "upload training images with /post_session_image or POST /sessions/<id>/images"
_HIRES_NOTE = 'an object: {"scale", "upscaler", "steps", "denoising_strength"}'
_INIT_LORA_NOTE = '{"iteration": n} or {"lora_filename": "..."}: a LoRA file of the session'

ALIASES: tuple[Alias, ...] = (
    # /txt2img
    Alias("cfg_scale", (A1111,), {GENERATION: "guidance_scale"}),
    Alias("cfg", (COMFY,), {GENERATION: "guidance_scale"}),
    Alias("num_inference_steps", (DIFFUSERS, COG), {GENERATION: "steps"}),
    Alias("sampler_name", (A1111, COMFY), {GENERATION: "scheduler"}, _SCHEDULER_NOTE),
    Alias("sampler_index", (A1111,), {GENERATION: "scheduler"}, _SCHEDULER_NOTE),
    Alias("sampler", (A1111,), {GENERATION: "scheduler"}, _SCHEDULER_NOTE),
    Alias("batch_size", (A1111, COMFY), {GENERATION: "num_images"}),
    Alias("n_iter", (A1111,), {GENERATION: "num_images"}),
    Alias("num_images_per_prompt", (DIFFUSERS,), {GENERATION: "num_images"}),
    Alias("num_outputs", (COG,), {GENERATION: "num_images"}),
    Alias("noise_seed", (COMFY,), {GENERATION: "seed"}),
    Alias("generator", (DIFFUSERS,), {GENERATION: "seed"}, "an integer, or null for a random one"),
    Alias("text", (COMFY,), {GENERATION: "prompt"}),
    Alias("negative", (COMFY,), {GENERATION: "negative_prompt"}),
    Alias("init_image", (), {GENERATION: "init_image_base64"}, "base64 of the image"),
    Alias("init_images", (A1111,), {GENERATION: "init_image_base64"}, "one image, base64"),
    Alias(
        "image",
        (DIFFUSERS, COG),
        {GENERATION: "init_image_base64", IMAGE: "image_base64"},
        "base64 of the image",
    ),
    Alias("image_base64", (), {GENERATION: "init_image_base64"}),
    Alias("denoising_strength", (A1111,), {GENERATION: "strength"}),
    Alias("mask", (A1111,), {GENERATION: "mask_base64"}, "base64 of the mask, white = repaint"),
    Alias("mask_image", (DIFFUSERS,), {GENERATION: "mask_base64"}, "base64 of the mask"),
    Alias("inpaint_full_res", (A1111,), {GENERATION: "inpaint_area"}, '"masked" (true) or "whole"'),
    Alias("inpaint_full_res_padding", (A1111,), {GENERATION: "inpaint_padding"}),
    Alias(
        "inpainting_fill",
        (A1111,),
        {GENERATION: "inpaint_fill"},
        '"fill", "original", "latent_noise" or "latent_nothing" (0 to 3)',
    ),
    Alias("denoise", (COMFY,), {GENERATION: "strength"}),
    Alias("prompt_strength", (COG,), {GENERATION: "strength"}),
    Alias("refine", (COG,), {GENERATION: "refiner"}, '"ensemble" or "none"'),
    Alias("refiner_checkpoint", (A1111,), {GENERATION: "refiner"}, '"ensemble" or "none"'),
    Alias("high_noise_frac", (COG,), {GENERATION: "refiner_switch"}),
    Alias("refiner_switch_at", (A1111,), {GENERATION: "refiner_switch"}),
    Alias("denoising_end", (DIFFUSERS,), {GENERATION: "refiner_switch"}),
    Alias("lora", (), {GENERATION: "loras"}, "a list of {session_id, iteration, scale}"),
    Alias(
        "cross_attention_kwargs",
        (DIFFUSERS,),
        {GENERATION: "lora_scale"},
        "a LoRA's scale is lora_scale, or each loras entry's scale",
    ),
    Alias("format", (), {GENERATION: "output_format"}, "png, jpeg (or jpg) or webp"),
    Alias("image_format", (), {GENERATION: "output_format"}, "png, jpeg (or jpg) or webp"),
    Alias("jpeg_quality", (), {GENERATION: "quality"}),
    Alias("restore_faces", (A1111,), note="this service has no face restoration"),
    Alias("tiling", (A1111,), note="this service makes no tiling images"),
    Alias("enable_hr", (A1111,), {GENERATION: "hires"}, _HIRES_NOTE),
    Alias("hr_scale", (A1111,), {GENERATION: "hires"}, "its scale"),
    Alias("hr_upscaler", (A1111,), {GENERATION: "hires"}, 'its upscaler: "latent" or "lanczos"'),
    Alias("hr_second_pass_steps", (A1111,), {GENERATION: "hires"}, "its steps"),
    Alias("styles", (A1111,), note="this service has no styles; put the words in the prompt"),
    Alias("override_settings", (A1111,), note=_MODEL_NOTE),
    Alias("ckpt_name", (COMFY,), note=_MODEL_NOTE),
    Alias("apply_watermark", (COG,), note="this service adds no watermark"),
    Alias("disable_safety_checker", (COG,), note="this service runs no safety checker"),
    # LoRAs: a loras entry, and /txt2img's one-LoRA shorthand
    Alias("weight", (), {LORA_ENTRY: "scale", GENERATION: "lora_scale"}),
    Alias("strength", (), {LORA_ENTRY: "scale"}),
    Alias("lora_scale", (COG,), {LORA_ENTRY: "scale"}),
    Alias("strength_model", (COMFY,), {LORA_ENTRY: "scale", GENERATION: "lora_scale"}),
    Alias(
        "strength_clip",
        (COMFY,),
        {LORA_ENTRY: "scale", GENERATION: "lora_scale"},
        "one scale applies to the UNet and the text encoders alike",
    ),
    Alias("lora_name", (COMFY,), {LORA_ENTRY: "lora_filename", GENERATION: "lora_filename"}),
    Alias("name", (), {LORA_ENTRY: "lora_filename", LORA_FILE: "filename"}),
    Alias("replicate_weights", (COG,), {GENERATION: "loras"}, "name LoRAs of this service"),
    # /train_lora
    Alias("max_train_steps", (KOHYA, DIFFUSERS, COG), {TRAINING: "steps"}),
    Alias("max_train_epochs", (KOHYA,), {TRAINING: "epochs"}),
    Alias("num_train_epochs", (DIFFUSERS, COG), {TRAINING: "epochs"}),
    Alias("train_batch_size", (KOHYA, DIFFUSERS, COG), {TRAINING: "batch_size"}),
    Alias("network_dim", (KOHYA,), {TRAINING: "rank"}),
    Alias("lora_rank", (COG,), {TRAINING: "rank"}),
    Alias("network_alpha", (KOHYA,), note="alpha is the rank here (a scale of 1); set rank"),
    Alias("lora_alpha", (DIFFUSERS,), note="alpha is the rank here (a scale of 1); set rank"),
    Alias("unet_lr", (KOHYA,), {TRAINING: "learning_rate"}),
    Alias("lr", (), {TRAINING: "learning_rate"}),
    Alias("unet_learning_rate", (COG,), {TRAINING: "learning_rate"}),
    Alias("lora_lr", (COG,), {TRAINING: "learning_rate"}),
    Alias("save_every_n_steps", (KOHYA,), {TRAINING: "checkpoint_every"}, "in steps"),
    Alias("checkpointing_steps", (DIFFUSERS, COG), {TRAINING: "checkpoint_every"}, "in steps"),
    Alias("save_every_n_epochs", (KOHYA,), {TRAINING: "checkpoint_every"}, "in steps"),
    Alias("sample_every_n_steps", (KOHYA,), {TRAINING: "sample_every"}, "in steps"),
    Alias("sample_every_n_epochs", (KOHYA,), {TRAINING: "sample_every"}, "in steps"),
    Alias("validation_epochs", (DIFFUSERS,), {TRAINING: "sample_every"}, "in steps"),
    Alias("validation_prompt", (DIFFUSERS,), {TRAINING: "sample_prompts"}, "a list of prompts"),
    Alias("sample_prompt", (), {TRAINING: "sample_prompts"}, "a list of prompts"),
    Alias("snr_gamma", (DIFFUSERS,), {TRAINING: "min_snr_gamma"}),
    Alias("caption_dropout_rate", (KOHYA,), {TRAINING: "caption_dropout"}),
    Alias("instance_prompt", (DIFFUSERS,), {TRAINING: "trigger"}),
    Alias("token_string", (COG,), {TRAINING: "trigger"}),
    Alias("caption_prefix", (COG,), {TRAINING: "trigger"}),
    Alias("train_text_encoder_lr", (), {TRAINING: "text_encoder_lr"}),
    Alias("lr_warmup", (), {TRAINING: "lr_warmup_steps"}, "in steps"),
    Alias(
        "network_train_unet_only",
        (KOHYA,),
        {TRAINING: "train_text_encoder"},
        "the UNet alone trains unless train_text_encoder is true",
    ),
    Alias(
        "prior_loss_weight",
        (KOHYA, DIFFUSERS),
        {TRAINING: "prior_preservation_weight"},
        _PRIOR_NOTE,
    ),
    Alias(
        "with_prior_preservation",
        (DIFFUSERS,),
        {TRAINING: "prior_preservation_weight"},
        "a weight (1.0 as diffusers' prior_loss_weight); " + _PRIOR_NOTE,
    ),
    Alias("class_data_dir", (DIFFUSERS,), note=_PRIOR_NOTE),
    Alias("reg_data_dir", (KOHYA,), note=_PRIOR_NOTE),
    Alias("num_class_images", (DIFFUSERS,), note=_PRIOR_NOTE),
    Alias("bucket", (), {TRAINING: "enable_bucket"}),
    Alias("alpha_mask", (KOHYA,), {TRAINING: "use_alpha_mask"}),
    Alias("masked_training", (ONETRAINER,), {TRAINING: "masked_loss"}),
    Alias(
        "unmasked_weight",
        (ONETRAINER,),
        {TRAINING: "background_weight"},
        "the loss weight where the mask is black, with masked_loss",
    ),
    Alias("random_seed", (), {TRAINING: "seed", GENERATION: "seed"}),
    Alias("optimizer_type", (KOHYA,), note="the optimizer is AdamW; it cannot be chosen"),
    Alias("mixed_precision", (KOHYA, DIFFUSERS), note="the worker picks the precision"),
    Alias("pretrained_model_name_or_path", (KOHYA, DIFFUSERS), note=_MODEL_NOTE),
    Alias("train_data_dir", (KOHYA,), note=_IMAGES_NOTE),
    Alias("instance_data_dir", (DIFFUSERS,), note=_IMAGES_NOTE),
    Alias("input_images", (COG,), note=_IMAGES_NOTE),
    Alias("output_name", (KOHYA,), note="runs are saved as lora_<n>.safetensors of the session"),
    # Continuing a LoRA: these tools take a path; init_lora names a LoRA file of the session.
    Alias("network_weights", (KOHYA,), {TRAINING: "init_lora"}, _INIT_LORA_NOTE),
    Alias("pretrained_lora_path", (AI_TOOLKIT,), {TRAINING: "init_lora"}, _INIT_LORA_NOTE),
    Alias("lora_model_name", (ONETRAINER,), {TRAINING: "init_lora"}, _INIT_LORA_NOTE),
    Alias(
        "dim_from_weights",
        (KOHYA,),
        note="a run continuing a LoRA (init_lora) takes its rank when rank is left out",
    ),
    # image uploads: /post_session_image (JSON) and POST /sessions/<id>/images (files)
    Alias("caption", (KOHYA,), {IMAGE: "prompt"}),
    Alias("prompt", (), {IMAGE_FILES: "caption"}),
    Alias("text", (), {IMAGE: "prompt", IMAGE_FILES: "caption"}),
    Alias("images", (), {IMAGE_FILES: "image"}, "one image field per file: -F image=@a.png"),
    Alias("file", (), {IMAGE_FILES: "image", LORA_FILE: "lora"}),
    Alias("zip", (), {IMAGE_FILES: "archive"}),
    Alias("image_base64", (), {IMAGE_FILES: "image"}, "a file: -F image=@a.png"),
    Alias("captions", (), {IMAGE_FILES: "caption"}, "one caption field per image, in order"),
    Alias("mask_image", (DIFFUSERS,), {IMAGE: "mask_base64", IMAGE_FILES: "mask"}),
    Alias("mask", (), {IMAGE: "mask_base64"}, "base64 of the mask"),
    Alias("masks", (), {IMAGE_FILES: "mask"}, "one mask field per image, in order"),
    # LoRA files
    Alias("lora_filename", (), {LORA_FILE: "filename"}),
    Alias("lora_name", (), {LORA_FILE: "filename"}),
    Alias("lora_file", (), {LORA_FILE: "lora"}),
    Alias("weights", (), {LORA_FILE: "lora"}),
)


def _by_name() -> dict[str, list[Alias]]:
    found: dict[str, list[Alias]] = {}
    for alias in ALIASES:
        found.setdefault(alias.name, []).append(alias)
    return found


_BY_NAME = _by_name()


def field_meant(name: str, fields: Collection[str], context: str | None) -> tuple[str, str]:
    """The field a request that sent the unknown `name` (to a serializer of `fields`, for
    `context`; None: any) most likely meant, and a note; ("", note) or ("", "") when
    none is known."""
    notes = ""
    for alias in _BY_NAME.get(name, ()):
        contexts = CONTEXTS if context is None else (context,)
        for each in contexts:
            ours = alias.ours.get(each)
            if ours is not None and ours in fields:
                return ours, alias.note
        if not alias.ours:
            notes = notes or alias.note
    if notes:
        return "", notes
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.75)
    if not close and "_" in name:
        # kohya's and diffusers' longer names: max_steps, sample_every_steps, ...
        close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
    return (close[0], "") if close else ("", "")


# The most of a name or value a message repeats.
_SHOWN_CHARS = 100
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def printable(text: str) -> str:
    """`text` as a message may repeat it: at most _SHOWN_CHARS characters, and a lone
    surrogate (valid in a JSON string, not in UTF-8) written as its escape."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(name: str) -> str:
    """A field name as a message shows it: as sent when plain (letters, digits, _ and -),
    else JSON-quoted (`""`, `"a.b"`, `"x y"`), so that the message still names it."""
    if _PLAIN_NAME.fullmatch(name) and len(name) <= _SHOWN_CHARS and name != "non_field_errors":
        return name
    return json.dumps(name[:_SHOWN_CHARS] + ("..." if len(name) > _SHOWN_CHARS else ""))


def unknown_field_message(name: str, fields: Collection[str], context: str | None) -> str:
    """The refusal of the unknown field `name`: `unknown field; did you mean "x"?`, with a
    note where the table has one."""
    meant, note = field_meant(name, fields, context)
    message = "unknown field"
    if meant:
        message += f'; did you mean "{meant}"?'
    if note:
        message += f" ({note})"
    return message
