"""What a training run and a generation take, and what each field means when left out.

The one definition of both: the API's request serializers take their field names and
defaults from here, the services record requests with them, and the engine runs them. It
imports no torch, so the web process validates a request against the same definitions the
worker will run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

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
    recipe: str = "original"  # one of RECIPES: where the defaults above came from


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
    given: Mapping[str, object], image_count: int, max_steps: int | None = None
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
    to keep within the limit (the service refuses it otherwise)."""
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
    return TrainingParams(**chosen)


@dataclass(frozen=True)
class GenerationParams:
    """How to render a prompt; every field has the default /txt2img applies."""

    negative_prompt: str = ""
    num_images: int = 1
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 7.0
    steps: int = 20
    lora_scale: float = 1.0


def lr_warmup_problem(lr_scheduler: str, lr_warmup_steps: int) -> str | None:
    """Why `lr_warmup_steps` cannot run under `lr_scheduler`, or None when it can."""
    if lr_warmup_steps and lr_scheduler == "constant":
        return "needs lr_scheduler constant_with_warmup or cosine (constant has no warm-up)"
    return None


GENERATION_DEFAULTS = GenerationParams()

# How the Refiner takes part in a generation: "ensemble" (SDXL's ensemble of experts: the
# Base denoises the first `refiner_switch` of the schedule, the Refiner the rest) or "none"
# (the Base alone runs the whole schedule; the Refiner is not called).
REFINER_POLICIES = ("ensemble", "none")
DEFAULT_REFINER_POLICY = "ensemble"
DEFAULT_REFINER_SWITCH = 0.8
# Under 1.0: diffusers treats denoising_start=1.0 as unset and has the Refiner redo the last
# 30% of the schedule (its img2img strength) on finished latents. The Base alone is "none".
REFINER_SWITCH_MIN, REFINER_SWITCH_MAX = 0.5, 0.99


def refiner_problem(refiner: str, refiner_switch: float) -> str | None:
    """Why `refiner` with `refiner_switch` cannot run, or None when it can."""
    if refiner not in REFINER_POLICIES:
        return f"refiner must be one of: {', '.join(REFINER_POLICIES)}"
    if refiner == "ensemble" and not REFINER_SWITCH_MIN <= refiner_switch <= REFINER_SWITCH_MAX:
        return f"refiner_switch must be from {REFINER_SWITCH_MIN} to {REFINER_SWITCH_MAX}"
    return None


# Seeds fit a signed 64-bit column (PostgreSQL bigint) and torch.Generator alike.
SEED_BITS = 63
# LoRAs one generation may apply together.
MAX_LORAS = 4


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each of a request's `count` images: `seed`, `seed + 1`, ... as
    AUTOMATIC1111 numbers them (wrapping within SEED_BITS); each image is made from its
    own seed alone, so a request for one image with seed `seed + i` gives image i again."""
    return [(seed + index) % 2**SEED_BITS for index in range(count)]


def strength_problem(strength: float) -> str | None:
    """Why an img2img `strength` cannot run, or None when it can."""
    if not 0.0 < strength <= 1.0:
        return "strength must be greater than 0 and at most 1"
    return None


def field_names(params_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(params_class))
