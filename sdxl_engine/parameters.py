"""What a training run and a generation take, and what each field means when left out.

The one definition of both: the API's request serializers take their field names and
defaults from here, the services record requests with them, and the engine runs them. It
imports no torch, so the web process validates a request against the same definitions the
worker will run.
"""

from __future__ import annotations

import io
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from sdxl_engine.prompt_syntax import PROMPT_SYNTAXES, prompt_problem
from sdxl_engine.schedulers import SCHEDULER_NAMES

# Learning-rate schedules, by the names kohya's sd-scripts and diffusers' scripts use.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine")
# "service": this service's recipe for teaching a subject (SERVICE_RECIPE); "original":
# the original service's (TrainingParams' own defaults: one epoch, rank 4, square crops).
RECIPES = ("service", "original")

# How long the service recipe trains, counted in image-views (steps x batch_size): 150 per
# image, as kohya's guides count repeats x epochs for a subject, never fewer than 1500
# and never more than cog-sdxl's 1000 steps x batch 4.
RECIPE_VIEWS_PER_IMAGE = 150
RECIPE_MIN_VIEWS = 1500
RECIPE_MAX_VIEWS = 4000
# cog-sdxl's warm-up (lr_warmup_steps 100), shortened to a tenth of a shorter run.
RECIPE_MAX_WARMUP_STEPS = 100
# sample_every and checkpoint_every of None: this many times a run.
WATCHES_PER_RUN = 4
# Without sample_prompts: the trigger alone, then the first captions, this many in all
# (sdxl_engine.training.samples).
DEFAULT_SAMPLE_PROMPTS = 3
# On the tiny random-weight model (a CPU demo: its LoRAs learn nothing meaningful) a run
# whose length the request left out trains at most this many steps: about 20 s on two
# CPU cores instead of the minutes the service recipe's 1500 image-views would take.
# Everything else (rank, rate, buckets, samples and checkpoints four times a run, the
# model's native 64² resolution) is the recipe's own.
TINY_RECIPE_MAX_STEPS = 100
# prior_preservation_weight's largest: the prior loss this many times the subject's. diffusers'
# DreamBooth script defaults its prior_loss_weight to 1; far above it the LoRA learns
# nothing but to stay the base model.
MAX_PRIOR_PRESERVATION_WEIGHT = 10.0
# Training images train at buckets of about this side squared; 64 divides by what both the
# SDXL UNet (32) and the tiny test UNet (16) need, so a run never fails on it later.
TRAINING_RESOLUTION_MULTIPLE = 64


@dataclass(frozen=True)
class TrainingParams:
    """A training run's settings. Its own defaults are the original service's recipe (one
    epoch at batch 4, rank 4, a constant rate, unweighted MSE, square crops); each option
    below is the one kohya's sd-scripts names alike."""

    batch_size: int = 4
    epochs: int | None = 1  # unused when steps is set
    steps: int | None = None  # overrides epochs when set
    learning_rate: float = 1e-4
    rank: int = 4
    resolution: int | None = None  # None: the model's native size (1024 for SDXL)
    seed: int | None = None  # None: a random seed, recorded in the file's metadata
    lr_scheduler: str = "constant"  # one of LR_SCHEDULERS
    lr_warmup_steps: int = 0  # steps of linear warm-up from 0 (with_warmup and cosine)
    # Min-SNR loss weighting (Hang et al. 2023): each step's loss is weighted by
    # min(SNR, gamma) / SNR of its timestep, so the easy low-noise steps stop dominating.
    # 0 turns it off.
    min_snr_gamma: float = 0.0
    # Per-image, per-channel offset added to the noise, times this: lets the LoRA learn
    # overall brightness (very dark or light images). 0 turns it off.
    noise_offset: float = 0.0
    # An identity token ("sks", "ohwx woman"): put before every caption that lacks it, and
    # the whole caption of an image uploaded without one.
    trigger: str | None = None
    # The probability that a sample trains with an empty caption, so the LoRA also learns
    # the subject without being prompted for it. 0 turns it off.
    caption_dropout: float = 0.0
    # Aspect-ratio buckets (kohya's --enable_bucket): each image trains at the SDXL size
    # nearest its aspect ratio (sdxl_engine.buckets) instead of a centred square.
    enable_bucket: bool = False
    # A LoRA on both text encoders' attention too (kohya's default for its LoRAs; off
    # here, as in cog-sdxl and diffusers' script), learning at text_encoder_lr (None:
    # learning_rate, as kohya's --text_encoder_lr). The encoders then run every step
    # instead of once per caption.
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    # Watching and keeping a run (kohya's sample_every_n_steps and save_every_n_steps):
    # every this many steps, sample images of sample_prompts (None: the trigger, then the
    # first captions) from sample_seed (None: the run's seed), and a checkpoint, a LoRA
    # file the run can also resume from. 0: never; None: four times a run.
    sample_every: int | None = 0
    sample_prompts: list[str] | None = None
    sample_seed: int | None = None
    checkpoint_every: int | None = 0
    # Masked loss (kohya's masked_loss, cog-sdxl's masks): each latent pixel's loss is
    # weighted by background_weight + (1 - background_weight) x the image's mask there: 1 on
    # the subject, background_weight (0 as in cog-sdxl) on the background. The mask is the
    # image's `<stem>_mask.png` (sdxl_engine.dataset.mask_path_for; an image without one
    # counts whole), or with use_alpha_mask its own alpha channel (kohya's alpha_mask,
    # which implies masked_loss as there; an image without alpha counts whole).
    masked_loss: bool = False
    background_weight: float = 0.0
    use_alpha_mask: bool = False
    # Prior preservation without regularisation photos (OneTrainer's prior-model
    # preservation): weight of a second loss that keeps the LoRA's prediction for
    # class_prompt at the base model's own, every step, on the step's own noisy latents.
    # 0 turns it off. class_prompt None: each image's caption without the trigger
    # (sdxl_engine.dataset.class_prompts).
    prior_preservation_weight: float = 0.0
    class_prompt: str | None = None
    # How many photos are withheld from training to measure the eval loss on (evenly
    # spaced: dataset.held_out_split); 0: the eval loss is over the training photos, so it
    # keeps falling as the LoRA memorises them. At most the image count - 1.
    eval_holdout: int = 0
    recipe: str = "original"  # one of RECIPES: where the defaults above came from

    @property
    def loss_masked(self) -> bool:
        """Whether the loss is weighted by masks: masked_loss, or use_alpha_mask, which
        implies it."""
        return self.masked_loss or self.use_alpha_mask


# This service's recipe: cog-sdxl's LoRA trainer (rank 32, learning rate 1e-4, batch 4,
# warm-up) for length, rank and rate; Min-SNR gamma 5 (the Min-SNR paper's value) and
# caption dropout 0.05 (ai-toolkit's default); aspect buckets as kohya and ai-toolkit;
# samples and checkpoints four times a run.
# Its steps (and warm-up) follow the number of images: see training_params.
SERVICE_RECIPE = TrainingParams(
    batch_size=4,
    epochs=None,
    learning_rate=1e-4,
    rank=32,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=RECIPE_MAX_WARMUP_STEPS,
    min_snr_gamma=5.0,
    caption_dropout=0.05,
    enable_bucket=True,
    sample_every=None,
    checkpoint_every=None,
    recipe="service",
)
ORIGINAL_RECIPE = TrainingParams()
_RECIPE_DEFAULTS = {"service": SERVICE_RECIPE, "original": ORIGINAL_RECIPE}


def every_steps(every: int | None, total_steps: int) -> int:
    """sample_every or checkpoint_every for a run of `total_steps`: 0 for never."""
    if every is None:
        return max(1, -(-total_steps // WATCHES_PER_RUN))
    return every


def sample_steps(sample_every: int | None, total_steps: int) -> list[int]:
    """The steps a run of `total_steps` samples at: every `sample_every` (every_steps), and
    the last step too, as kohya's sd-scripts does, so the finished LoRA always has samples.
    Empty for never (0)."""
    every = every_steps(sample_every, total_steps)
    if not every or total_steps < 1:
        return []
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else [*steps, total_steps]


def checkpoint_steps(checkpoint_every: int | None, total_steps: int) -> list[int]:
    """The steps a run of `total_steps` keeps a checkpoint at: every `checkpoint_every`
    (every_steps) before the last (whose file is the LoRA itself). Empty for never."""
    every = every_steps(checkpoint_every, total_steps)
    return list(range(every, total_steps, every)) if every else []


# The most files one run keeps along the way, however small its checkpoint_every and
# sample_every (kohya's save_every_n_steps and sample_every_n_steps, ai-toolkit's
# save_every and sample_every, bound neither; ai-toolkit prunes old checkpoints instead,
# max_step_saves_to_keep): enough to watch a run closely, too few to fill a disk.
MAX_CHECKPOINTS_PER_RUN = 100
MAX_SAMPLE_IMAGES_PER_RUN = 400


def watch_problems(
    params: TrainingParams, total_steps: int, sample_prompt_count: int
) -> dict[str, str]:
    """checkpoint_every or sample_every that would keep more files than a run may in a run
    of `total_steps` (an upper bound when only the epochs are known), by field: the
    message names the bound and the smallest value that keeps to it."""
    problems = {}
    checkpoints = len(checkpoint_steps(params.checkpoint_every, total_steps))
    if checkpoints > MAX_CHECKPOINTS_PER_RUN:
        least = (total_steps - 1) // (MAX_CHECKPOINTS_PER_RUN + 1) + 1
        problems["checkpoint_every"] = (
            f"{params.checkpoint_every} keeps {checkpoints} checkpoints in a run of up to "
            f"{total_steps} steps, more than the {MAX_CHECKPOINTS_PER_RUN} a run may keep: "
            f"at least {least} (or 0: none)"
        )
    images = len(sample_steps(params.sample_every, total_steps)) * sample_prompt_count
    if images > MAX_SAMPLE_IMAGES_PER_RUN:
        most_steps = max(1, MAX_SAMPLE_IMAGES_PER_RUN // sample_prompt_count)
        least = -(-total_steps // most_steps)
        problems["sample_every"] = (
            f"{params.sample_every} renders {images} sample images ({sample_prompt_count} "
            f"prompts) in a run of up to {total_steps} steps, more than the "
            f"{MAX_SAMPLE_IMAGES_PER_RUN} a run may render: at least {least} (or 0: none)"
        )
    return problems


def default_training_resolution(native_side: int, max_side: int) -> int:
    """The resolution a run that left it out trains at: the model's native side, capped as
    a given resolution is, at `max_side` (SDXL_MAX_IMAGE_SIDE) rounded down to
    TRAINING_RESOLUTION_MULTIPLE."""
    multiple = TRAINING_RESOLUTION_MULTIPLE
    return min(native_side, max_side // multiple * multiple)


def recipe_of(given: Mapping[str, object]) -> str:
    """The recipe a request's unspecified fields come from: the one it names, else the
    original's when it sets the run's length itself (steps or epochs), else the service's."""
    named = given.get("recipe")
    if named is not None:
        return str(named)
    return "original" if given.get("steps") or given.get("epochs") else "service"


def recipe_defaults(recipe: str) -> TrainingParams:
    return _RECIPE_DEFAULTS[recipe]


def recipe_views(image_count: int) -> int:
    """How many image-views the service recipe trains `image_count` images for."""
    return min(RECIPE_MAX_VIEWS, max(RECIPE_MIN_VIEWS, RECIPE_VIEWS_PER_IMAGE * image_count))


def fewest_steps(epochs: int, image_count: int, batch_size: int) -> int:
    """The steps `epochs` epochs take at the least: full batches of one size. Aspect
    buckets add a batch for each size's remainder, one image per batch at the most."""
    return epochs * -(-image_count // batch_size)


def training_params(
    given: Mapping[str, object],
    image_count: int,
    max_steps: int | None = None,
    *,
    tiny: bool = False,
) -> TrainingParams:
    """The whole recipe of a run: the fields the caller gave, the rest from its recipe
    (recipe_of). The service recipe trains whole epochs until every image has been seen
    enough for recipe_views(image_count) image-views in all (counted in epochs, because
    with aspect buckets a batch may hold fewer than batch_size images), and warms up for
    a tenth of the steps, at most RECIPE_MAX_WARMUP_STEPS, unless the caller says
    otherwise. Exactly one of steps and epochs is set in the result.

    A length the caller left out keeps to `max_steps` (the service's limit on steps): when
    its epochs could take more steps than that (one image per batch), it becomes that many
    steps instead, or fewer (the epochs' fewest_steps). A length the caller gave is theirs
    to keep within the limit (the service refuses it otherwise).

    On the `tiny` model a length left out is also capped at TINY_RECIPE_MAX_STEPS steps
    (of the service recipe; the original's one epoch is shorter anyway)."""
    if tiny:
        max_steps = min(max_steps or TINY_RECIPE_MAX_STEPS, TINY_RECIPE_MAX_STEPS)
    recipe = recipe_of(given)
    defaults = recipe_defaults(recipe)
    chosen = {**asdict(defaults), **given, "recipe": recipe}
    if chosen.get("steps"):
        chosen["epochs"] = None
    else:
        if not chosen.get("epochs"):
            chosen["epochs"] = -(-recipe_views(image_count) // max(image_count, 1))
        most_steps = chosen["epochs"] * image_count
        if "epochs" not in given and max_steps is not None and most_steps > max_steps:
            fewest = fewest_steps(chosen["epochs"], image_count, chosen["batch_size"])
            chosen["steps"], chosen["epochs"] = min(max_steps, fewest), None
    if "lr_warmup_steps" not in given:
        if chosen["lr_scheduler"] == "constant":
            chosen["lr_warmup_steps"] = 0
        elif recipe == "service":
            # With buckets an epoch may take more batches than this: a tenth at least.
            steps = chosen["steps"] or chosen["epochs"] * -(-image_count // chosen["batch_size"])
            chosen["lr_warmup_steps"] = min(RECIPE_MAX_WARMUP_STEPS, steps // 10)
    if chosen["use_alpha_mask"]:
        # Implied (loss_masked); recorded, so the run's parameters say how it trains.
        chosen["masked_loss"] = True
    return TrainingParams(**chosen)


def lr_warmup_problem(lr_scheduler: str, lr_warmup_steps: int) -> str | None:
    """Why `lr_warmup_steps` cannot run under `lr_scheduler`, or None when it can."""
    if lr_warmup_steps and lr_scheduler == "constant":
        return "needs lr_scheduler constant_with_warmup or cosine (constant has no warm-up)"
    return None


def field_names(params_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(params_class))


# --- Generation --------------------------------------------------------------------------

# How the Refiner takes part in a generation: "ensemble" (SDXL's ensemble of experts: the
# Base denoises the first `refiner_switch` of the schedule, the Refiner the rest) or "none"
# (the Base alone runs the whole schedule; the Refiner is not called).
REFINER_POLICIES = ("ensemble", "none")
DEFAULT_REFINER_POLICY = "ensemble"
# The Base denoises the first 80% of the schedule (the high-noise steps), the Refiner the
# rest, as in SDXL's ensemble-of-experts setup.
DEFAULT_REFINER_SWITCH = 0.8
# Under 1.0: diffusers treats denoising_start=1.0 as unset and has the Refiner redo the last
# 30% of the schedule (its img2img strength) on finished latents. The Base alone is "none".
REFINER_SWITCH_MIN, REFINER_SWITCH_MAX = 0.5, 0.99
# AUTOMATIC1111's default img2img denoising strength.
DEFAULT_STRENGTH = 0.75
# The images' file formats; quality (A1111's `jpeg_quality`, default 80) for the lossy ones.
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# Other names a request may give a format by (the files are named .jpg).
OUTPUT_FORMAT_ALIASES = {"jpg": "jpeg"}
DEFAULT_OUTPUT_FORMAT = OUTPUT_FORMATS[0]
QUALITY_FORMATS = ("jpeg", "webp")
DEFAULT_QUALITY = 80
# A LoRA's strength when a request gives none (A1111's <lora:name:1>).
DEFAULT_LORA_SCALE = 1.0
# Seeds fit a signed 64-bit column (PostgreSQL bigint) and torch.Generator alike.
SEED_BITS = 63
# LoRAs one generation may apply together.
MAX_LORAS = 4


def one_of(choices: tuple[str, ...]) -> str:
    """The message for a name outside `choices` (the API's field errors use it too)."""
    return f"must be one of: {', '.join(choices)}"


# --- Inpainting and outpainting
# A1111's img2img defaults: mask_blur 4, inpaint_full_res_padding 32, inpainting_fill 1
# ("original"), inpaint_full_res off ("whole"); the UI's slider ranges as limits.
DEFAULT_MASK_BLUR = 4
MASK_BLUR_MAX = 64
DEFAULT_INPAINT_PADDING = 32
INPAINT_PADDING_MAX = 256
# "whole": the whole image is inpainted at width x height; "masked" (A1111's "Only
# masked", inpaint_full_res): the mask's box plus inpaint_padding, at width x height.
INPAINT_AREAS = ("whole", "masked")
# What the masked area starts from, A1111's inpainting_fill 0..3 in order.
INPAINT_FILLS = ("fill", "original", "latent_noise", "latent_nothing")
DEFAULT_INPAINT_FILL = "original"
OUTPAINT_SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Outpaint:
    """Outpainting's margins in px, each a multiple of IMAGE_SIDE_MULTIPLE, one at least
    above 0: the canvas grows by them around the init image, and the new area (with a
    seam of mask_blur px into the image) is inpainted."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0


def outpaint_problem(outpaint: Outpaint) -> str | None:
    """What is wrong with these margins (their sides; the canvas's size is checked where
    the size limit is known), or None."""
    sides = [getattr(outpaint, side) for side in OUTPAINT_SIDES]
    if any(isinstance(side, bool) or not isinstance(side, int) or side < 0 for side in sides):
        return "left, right, top and bottom must be integers >= 0"
    if any(side % IMAGE_SIDE_MULTIPLE for side in sides):
        return f"left, right, top and bottom must be multiples of {IMAGE_SIDE_MULTIPLE}"
    if not any(sides):
        return "needs a margin above 0 on at least one side"
    return None


def canvas_problem(canvas_size: tuple[int, int], max_side: int) -> str | None:
    """Outpainting's grown canvas (GenerationParams.canvas_size) past `max_side`
    (SDXL_MAX_IMAGE_SIDE), or None."""
    width, height = canvas_size
    if max(width, height) <= max_side:
        return None
    return (
        f"grows the canvas to {width}x{height}, past the {max_side} px a side may have "
        "(SDXL_MAX_IMAGE_SIDE): smaller margins, width or height"
    )


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA a request applies: any session's, by iteration or file name (a checkpoint's
    included), else the session's latest; at `scale`. Which file that is, the service
    finds in the database when it records the request."""

    session_id: int
    iteration: int | None = None
    lora_filename: str | None = None
    scale: float = DEFAULT_LORA_SCALE


# --- face detail: ADetailer's names and defaults (Bing-su/adetailer, adetailer/args.py)
# ad_denoising_strength: how much of each face is redone.
DEFAULT_FACE_STRENGTH = 0.4
# ad_inpaint_only_masked_padding: pixels of the image around the face (and its feathered
# edge) that the face's crop takes in as context.
DEFAULT_FACE_PADDING = 32
# ADetailer's UI slider for the padding goes to 256.
MAX_FACE_PADDING = 256
# ADetailer redoes every face it finds unless told "mask only top k"; a cap bounds the
# passes one image may cost (each face is a native-size img2img run), largest faces first.
DEFAULT_MAX_FACES = 4
MAX_FACES = 16
# Not request fields, ADetailer's defaults as it writes them: the face's mask grows by
# ad_dilate_erode pixels, then is blurred by ad_mask_blur pixels (A1111's mask blur).
FACE_DILATE = 4
FACE_MASK_BLUR = 4
# The detector, as the infotext's "ADetailer model" names it: OpenCV's frontal-face cascade
# (sdxl_engine.masking.FACE_CASCADE, the file in cv2.data.haarcascades).
FACE_DETAIL_MODEL = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class FaceDetail:
    """The face detail pass (ADetailer's flow): every face found in an image, largest
    first up to `max_faces`, is cropped with `padding`, redone by img2img at the model's
    native size at `strength` with `prompt` (empty: the request's own) and pasted back
    through a feathered mask."""

    strength: float = DEFAULT_FACE_STRENGTH
    prompt: str = ""
    padding: int = DEFAULT_FACE_PADDING
    max_faces: int = DEFAULT_MAX_FACES

    def problems(self) -> str | None:
        """What keeps this pass from running, as one message; None when nothing does."""
        if not 0.0 < self.strength <= 1.0:
            return "strength must be greater than 0 and at most 1"
        if not 0 <= self.padding <= MAX_FACE_PADDING:
            return f"padding must be from 0 to {MAX_FACE_PADDING}"
        if not 1 <= self.max_faces <= MAX_FACES:
            return f"max_faces must be from 1 to {MAX_FACES}"
        return None


def img2img_steps(steps: int, strength: float) -> int:
    """The denoising steps an img2img run of `steps` at `strength` takes, Base and Refiner
    together: all of them at strength 1, else int(steps x strength), as diffusers' img2img
    counts them (get_timesteps; first-order schedulers: a second-order one runs about twice
    as many)."""
    return min(int(steps * strength), steps) if strength < 1.0 else steps


# --- hires: A1111's hires fix (enable_hr): a text-to-image pass at width x height, its
# result upscaled by `scale` and reworked by an img2img pass at the larger size.
# The upscalers: "latent" (A1111's "Latent": the latents, bilinear, no antialiasing) and
# "lanczos" (A1111's "Lanczos": the decoded image, PIL's Lanczos), named in the infotext's
# "Hires upscaler" as A1111 names them.
HIRES_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}
HIRES_UPSCALER_NAMES = tuple(HIRES_UPSCALERS)
DEFAULT_HIRES_SCALE = 2.0  # A1111's hr_scale
DEFAULT_HIRES_UPSCALER = "latent"  # A1111's latent_upscale_default_mode, "Latent"
# A1111's UI default for the hires pass's denoising strength (its API's is 0.75, img2img's).
DEFAULT_HIRES_STRENGTH = 0.7
HIRES_SCALE_MAX = 4.0


@dataclass(frozen=True)
class HiresFix:
    """A request's hires fix (A1111's enable_hr with hr_scale, hr_upscaler,
    hr_second_pass_steps and denoising_strength): the first pass's images upscaled by
    `scale` with `upscaler`, then denoised again at `denoising_strength` over `steps`
    (None: the request's steps, as A1111's 0)."""

    scale: float = DEFAULT_HIRES_SCALE
    upscaler: str = DEFAULT_HIRES_UPSCALER  # one of HIRES_UPSCALER_NAMES
    steps: int | None = None
    denoising_strength: float = DEFAULT_HIRES_STRENGTH

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the hires pass for a first pass of width x height: A1111's
        hr_upscale_to_x/y, int(side * scale), as its latents have it (a multiple of 8,
        rounded down: the latents are side // 8)."""
        multiple = IMAGE_SIDE_MULTIPLE
        return (
            int(width * self.scale) // multiple * multiple,
            int(height * self.scale) // multiple * multiple,
        )

    def run_steps(self, request_steps: int) -> int:
        """The denoising steps the pass runs, Base and Refiner together: img2img_steps of
        its schedule (steps, None: the request's) at denoising_strength."""
        return img2img_steps(self.steps or request_steps, self.denoising_strength)

    def problem(self) -> str | None:
        """What is wrong with these settings (the API answers it under `hires`), or None."""
        if isinstance(self.scale, bool) or not 1.0 < self.scale <= HIRES_SCALE_MAX:
            return f"scale must be above 1 and at most {HIRES_SCALE_MAX:g}"
        if self.upscaler not in HIRES_UPSCALERS:
            return f"upscaler {one_of(HIRES_UPSCALER_NAMES)}"
        if self.steps is not None and self.steps < 1:
            return "steps must be at least 1 (or null: the request's steps)"
        if not 0.0 < self.denoising_strength <= 1.0:
            return "denoising_strength must be above 0 and at most 1"
        return None


@dataclass(frozen=True)
class GenerationParams:
    """Every knob of one /txt2img request, with the default it takes when left out.

    The API's serializer declares one field for each (a test holds them equal), the
    service records them on the Generation row (`record`, and the prompt, negative prompt
    and seed columns), and the engine renders them (sdxl_engine.generation). `problems()`
    is the one check of their rules. A field whose default is None is recorded only when
    given, so a row tells what its request asked for: None means the default named beside
    it. `filled()` gives what the engine runs: a seed and img2img's strength chosen.
    """

    prompt: str = ""
    negative_prompt: str = ""
    num_images: int = 1
    # None: the model's native size (1024 for SDXL, 64 for the tiny model); with an
    # init_image, its aspect ratio at about the native area (default_image_size). `sized`
    # fills them; the service records them filled.
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.0
    steps: int = 20
    seed: int | None = None  # None: a random seed (filled), recorded
    scheduler: str | None = None  # a name of schedulers.SCHEDULERS; None: the model's own
    refiner: str | None = None  # one of REFINER_POLICIES; None: DEFAULT_REFINER_POLICY
    # The Base's share of the schedule under "ensemble"; None: DEFAULT_REFINER_SWITCH.
    refiner_switch: float | None = None
    # img2img: the image to start from, the file's bytes as sent (kept beside the row, not
    # in its JSON), resized to width x height; None: text-to-image.
    init_image: bytes | None = field(default=None, repr=False)
    strength: float | None = None  # img2img's; None: DEFAULT_STRENGTH with an init_image
    output_format: str | None = None  # one of OUTPUT_FORMATS; None: DEFAULT_OUTPUT_FORMAT
    quality: int | None = None  # jpeg and webp only; None: DEFAULT_QUALITY
    # The LoRAs applied to the Base, in order. The row keeps the files they named instead
    # (GenerationLora), and the engine takes those files (lora_merge.AppliedLora).
    loras: tuple[LoraChoice, ...] = ()
    # --- prompts (issue 28)
    # How prompt and negative_prompt are read: one of PROMPT_SYNTAXES; None: "a1111"
    # (AUTOMATIC1111's (word:1.2), [word], BREAK; sdxl_engine.prompt_syntax). Either way
    # they are encoded in 75-token chunks, never cut at 77 tokens.
    prompt_syntax: str | None = None
    # --- Inpainting and outpainting (AUTOMATIC1111's img2img inpaint fields)
    # The mask's bytes as sent (white = repaint; kept beside the row as the init image
    # is), resized to width x height; needs init_image.
    mask: bytes | None = field(default=None, repr=False)
    # With a mask or outpaint (filled() sets the defaults then, so the row says what ran):
    mask_blur: int | None = None  # px, A1111's mask_blur; None: DEFAULT_MASK_BLUR
    inpaint_area: str | None = None  # one of INPAINT_AREAS; None: "whole"
    inpaint_padding: int | None = None  # px, inpaint_full_res_padding; None: DEFAULT_...
    inpaint_fill: str | None = None  # one of INPAINT_FILLS; None: "original"
    # Grow the init image's canvas by these margins and inpaint the new area; the image
    # itself is sized width x height, the result canvas_size.
    outpaint: Outpaint | None = None
    # --- face detail
    # ADetailer's pass over each finished image (FaceDetail); None: no face pass.
    face_detail: FaceDetail | None = None
    # --- hires
    # A1111's hires fix: a second, img2img pass at hires.size(width, height); the images
    # have that size. Text-to-image only; None: no second pass.
    hires: HiresFix | None = None

    def __post_init__(self) -> None:
        # A nested field read back from a row's JSON (or given as a dict) becomes its
        # dataclass, so that the engine and batch_key see one type either way.
        for name, nested_class in NESTED_PARAMS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, nested_class(**value))

    def problems(self) -> dict[str, str]:
        """What keeps these params from running, by field; empty when nothing does. The
        API answers each as `field: message`, the engine as `field message`."""
        problems = {}
        if self.strength is not None:
            if self.init_image is None:
                problems["strength"] = "applies only with init_image_base64 (img2img)"
            elif self.strength <= 0.0:
                problems["strength"] = "must be greater than 0"
            elif self.strength > 1.0:
                problems["strength"] = "must be at most 1"
        problems.update(output_problems(self.output_format, self.quality))
        if self.refiner is not None and self.refiner not in REFINER_POLICIES:
            problems["refiner"] = one_of(REFINER_POLICIES)
        elif self.refiner_switch is not None:
            if self.refiner == "none":
                problems["refiner_switch"] = 'applies only when refiner is "ensemble"'
            elif not REFINER_SWITCH_MIN <= self.refiner_switch <= REFINER_SWITCH_MAX:
                problems["refiner_switch"] = (
                    f"must be from {REFINER_SWITCH_MIN} to {REFINER_SWITCH_MAX}"
                )
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            problems["scheduler"] = one_of(SCHEDULER_NAMES)
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        if len(self.loras) > MAX_LORAS:
            problems["loras"] = f"may name at most {MAX_LORAS} LoRAs"
        # --- prompts (issue 28)
        if self.prompt_syntax is not None and self.prompt_syntax not in PROMPT_SYNTAXES:
            problems["prompt_syntax"] = one_of(PROMPT_SYNTAXES)
        else:
            for name in ("prompt", "negative_prompt"):
                problem = prompt_problem(getattr(self, name), self.prompt_syntax)
                if problem is not None:
                    problems[name] = problem
        # --- face detail
        if self.face_detail is not None:
            face_problem = self.face_detail.problems()
            if face_problem is not None:
                problems["face_detail"] = face_problem
        # --- hires
        if self.hires is not None:
            hires_problem = self.hires.problem()
            if hires_problem is None and self.init_image is not None:
                # A1111's enable_hr is txt2img's: its img2img has no hires pass.
                hires_problem = "applies only to text-to-image, not with init_image_base64"
            if hires_problem is None and self.hires.run_steps(self.steps) < 1:
                hires_problem = (
                    "its steps x denoising_strength is under 1: the pass would run no step"
                )
            if hires_problem is not None:
                problems["hires"] = hires_problem
        problems.update(self._inpaint_problems())
        return problems

    def _inpaint_problems(self) -> dict[str, str]:
        problems = {}
        if self.mask is not None and self.init_image is None:
            problems["mask"] = "needs init_image_base64 (the image to inpaint)"
        if self.outpaint is not None:
            problem = outpaint_problem(self.outpaint)
            if problem is None and self.init_image is None:
                problem = "needs init_image_base64 (the image to extend)"
            if problem is None and self.mask is not None:
                problem = "not with mask_base64: outpainting makes its own mask"
            if problem is not None:
                problems["outpaint"] = problem
        inpainting = self.mask is not None or self.outpaint is not None
        limits = {"mask_blur": MASK_BLUR_MAX, "inpaint_padding": INPAINT_PADDING_MAX}
        choices = {"inpaint_area": INPAINT_AREAS, "inpaint_fill": INPAINT_FILLS}
        for name in ("mask_blur", "inpaint_area", "inpaint_padding", "inpaint_fill"):
            value = getattr(self, name)
            if value is None:
                continue
            if not inpainting:
                problems[name] = "applies only with mask_base64 or outpaint"
            elif name in choices and value not in choices[name]:
                problems[name] = one_of(choices[name])
            elif name in limits and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= limits[name]
            ):
                problems[name] = f"must be an integer from 0 to {limits[name]}"
        return problems

    def filled(self) -> GenerationParams:
        """These params as they run and are recorded: a random seed when none was given,
        and img2img's DEFAULT_STRENGTH when an init_image came without a strength."""
        seed = secrets.randbits(SEED_BITS) if self.seed is None else self.seed
        strength = self.strength
        if self.init_image is not None and strength is None:
            strength = DEFAULT_STRENGTH
        filled = replace(self, seed=seed, strength=strength)
        if self.mask is None and self.outpaint is None:
            return filled
        # Inpainting's settings as they run, recorded: the row says what ran, and a
        # recorded row (without its mask's bytes) never batches with a plain img2img one.
        return replace(
            filled,
            mask_blur=DEFAULT_MASK_BLUR if self.mask_blur is None else self.mask_blur,
            inpaint_area=self.inpaint_area or INPAINT_AREAS[0],
            inpaint_padding=(
                DEFAULT_INPAINT_PADDING if self.inpaint_padding is None else self.inpaint_padding
            ),
            inpaint_fill=self.inpaint_fill or DEFAULT_INPAINT_FILL,
        )

    def for_later_pass(self) -> GenerationParams:
        """These params as a pass over their finished images takes them (a face's img2img,
        the face detail pass): the size the images have (outpainting's grown canvas, the
        hires pass's), and none of what made them (mask, outpaint and inpaint settings,
        hires) or reworks them (face_detail)."""
        width, height = self.width, self.height
        if width is not None and height is not None:
            width, height = self.output_size
        return replace(
            self,
            width=width,
            height=height,
            mask=None,
            mask_blur=None,
            inpaint_area=None,
            inpaint_padding=None,
            inpaint_fill=None,
            outpaint=None,
            hires=None,
            face_detail=None,
        )

    @property
    def inpainting(self) -> bool:
        """A mask or outpainting: the engine inpaints (sdxl_engine.generation.inpaint)."""
        return self.mask is not None or self.outpaint is not None

    def sized(
        self,
        native_side: int,
        max_side: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> GenerationParams:
        """These params with a width and height: those given, else default_image_size's for
        a model of `native_side` (from the init_image's `image_size`, read from its bytes
        when not given)."""
        if self.width is not None and self.height is not None:
            return self
        if self.init_image is not None and image_size is None:
            image_size = image_dimensions(self.init_image)
        width, height = default_image_size(native_side, image_size, max_side)
        return replace(
            self,
            width=self.width if self.width is not None else width,
            height=self.height if self.height is not None else height,
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height); the params must be sized."""
        assert self.width is not None and self.height is not None, "unsized GenerationParams"
        return self.width, self.height

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(width, height) of the first pass: `size`, grown by outpaint's margins."""
        width, height = self.size
        if self.outpaint is None:
            return width, height
        margins = self.outpaint
        return width + margins.left + margins.right, height + margins.top + margins.bottom

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images made: the hires pass's with a hires fix, else
        canvas_size (outpainting's grown canvas, or `size`); the params must be sized."""
        if self.hires is None:
            return self.canvas_size
        return self.hires.size(*self.size)

    @property
    def refiner_policy(self) -> str:
        return self.refiner or DEFAULT_REFINER_POLICY

    @property
    def refiner_switch_at(self) -> float | None:
        """Where the Refiner takes over; None when it does not run."""
        if self.refiner_policy != "ensemble":
            return None
        return DEFAULT_REFINER_SWITCH if self.refiner_switch is None else self.refiner_switch

    @property
    def file_format(self) -> str:
        return self.output_format or DEFAULT_OUTPUT_FORMAT

    @property
    def seeds(self) -> list[int]:
        """Each image's own seed (image_seeds); the params must be filled."""
        assert self.seed is not None, "unfilled GenerationParams have no seeds"
        return image_seeds(self.seed, self.num_images)

    def batch_key(self) -> tuple[tuple[str, object], ...]:
        """What requests must share to render in one batch (one call of the pipelines):
        every field but each request's own (PER_REQUEST), the Refiner's part as it runs
        (a request that left it out batches with one that named the default). A new field
        therefore keeps requests apart until it is listed as their own."""
        resolved = {"refiner": self.refiner_policy, "refiner_switch": self.refiner_switch_at}
        return tuple(
            (field.name, resolved.get(field.name, getattr(self, field.name)))
            for field in fields(self)
            if field.name not in PER_REQUEST
        )

    def record(self) -> dict[str, Any]:
        """The Generation row's `parameters` JSON: every field but those it keeps apart
        (RECORDED_APART); one whose default is None only when given, so a request without
        it runs as it did before the field existed."""
        return {
            field.name: _json_value(getattr(self, field.name))
            for field in fields(self)
            if field.name not in RECORDED_APART
            and (field.default is not None or getattr(self, field.name) is not None)
        }


def _json_value(value: object) -> object:
    """A param as the row's JSON keeps it: a nested dataclass (NESTED_PARAMS) as a dict."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


# The GenerationParams fields that hold a dataclass of their own (an object in the API's
# body and in the row's JSON), by name: __post_init__ builds it from a dict.
NESTED_PARAMS: dict[str, type] = {
    "outpaint": Outpaint,
    "hires": HiresFix,
    "face_detail": FaceDetail,
}


# Each request's own within a batch: its prompts, image count, seed and starting image, its
# output file, and its LoRAs (which the service compares by the files' content instead).
PER_REQUEST = frozenset(
    {
        "prompt",
        "negative_prompt",
        "num_images",
        "seed",
        "init_image",
        "loras",
        "output_format",
        "quality",
        "mask",
    }
)
# What a Generation row keeps outside its `parameters` JSON: the prompts and seed in
# columns, the starting image in a file, the LoRAs' files in rows of their own.
RECORDED_APART = ("prompt", "negative_prompt", "seed", "init_image", "loras", "mask")
GENERATION_DEFAULTS = GenerationParams()


# Generated sides are multiples of this (the VAE's scale factor), at least IMAGE_SIDE_MIN.
IMAGE_SIDE_MULTIPLE = 8
IMAGE_SIDE_MIN = 64


def default_image_size(
    native_side: int, image_size: tuple[int, int] | None = None, max_side: int | None = None
) -> tuple[int, int]:
    """(width, height) of a generation that gave none: the model's native square, or, from
    an img2img image of `image_size` (width, height), that image's aspect ratio at about the
    native area, each side the nearest multiple of IMAGE_SIDE_MULTIPLE, at least
    IMAGE_SIDE_MIN and at most `max_side` (scaled down together, keeping the ratio, when the
    longer side would pass it; scaled up when the shorter would fall under the minimum)."""
    multiple = IMAGE_SIDE_MULTIPLE
    largest = None if max_side is None else max(IMAGE_SIDE_MIN, max_side // multiple * multiple)
    if image_size is None or min(image_size) < 1:
        square = native_side if largest is None else min(native_side, largest)
        return square, square
    width, height = image_size
    scale = native_side / math.sqrt(width * height)
    if largest is not None:
        scale = min(scale, largest / max(width, height))
    scale = max(scale, IMAGE_SIDE_MIN / min(width, height))

    def side(length: int) -> int:
        rounded = max(IMAGE_SIDE_MIN, round(length * scale / multiple) * multiple)
        return rounded if largest is None else min(largest, rounded)

    return side(width), side(height)


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def output_problems(output_format: str | None, quality: object) -> dict[str, str]:
    """What is wrong with asking for `output_format` (None: DEFAULT_OUTPUT_FORMAT) at
    `quality` (None: the format's default, else an integer from 1 to 100, and only for jpeg
    and webp: PNG is lossless)."""
    output_format = output_format or DEFAULT_OUTPUT_FORMAT
    if output_format not in OUTPUT_FORMATS:
        return {"output_format": one_of(OUTPUT_FORMATS)}
    if quality is None:
        return {}
    if output_format not in QUALITY_FORMATS:
        return {"quality": f"applies only to {' and '.join(QUALITY_FORMATS)}, not {output_format}"}
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        return {"quality": "must be an integer from 1 to 100"}
    return {}


def problems_text(problems: Mapping[str, str]) -> str:
    """Problems as one sentence for a log or an exception: `field message; ...`."""
    return "; ".join(f"{name} {message}" for name, message in problems.items())


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each of a request's `count` images: `seed`, `seed + 1`, ... as
    AUTOMATIC1111 numbers them (wrapping within SEED_BITS); each image is made from its
    own seed alone, so a request for one image with seed `seed + i` gives image i again."""
    return [(seed + index) % 2**SEED_BITS for index in range(count)]
