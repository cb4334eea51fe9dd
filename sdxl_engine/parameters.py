"""What a training run and a generation take, and what each field means when left out.

The one definition of both: the API's request serializers take their field names and
defaults from here, the services record requests with them, and the engine runs them. It
imports no torch, so the web process validates a request against the same definitions the
worker will run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Learning-rate schedules, by the names kohya's sd-scripts and diffusers' scripts use.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine")


@dataclass(frozen=True)
class TrainingParams:
    """A training run's settings. The loss and schedule default to the plain recipe (constant
    rate, unweighted MSE): each option below is the one kohya's sd-scripts names alike."""

    batch_size: int = 4
    epochs: int = 1
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


TRAINING_DEFAULTS = TrainingParams()
GENERATION_DEFAULTS = GenerationParams()


def field_names(params_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(params_class))
