"""What a training run and a generation take, and what each field means when left out.

The one definition of both: the API's request serializers take their field names and
defaults from here, the services record requests with them, and the engine runs them. It
imports no torch, so the web process validates a request against the same definitions the
worker will run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TrainingParams:
    batch_size: int = 4
    epochs: int = 1
    steps: int | None = None  # overrides epochs when set
    learning_rate: float = 1e-4
    rank: int = 4
    resolution: int | None = None  # None: the model's native size (1024 for SDXL)
    seed: int | None = None  # None: a random seed, recorded in the file's metadata


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


TRAINING_DEFAULTS = TrainingParams()
GENERATION_DEFAULTS = GenerationParams()


def field_names(params_class: type) -> frozenset[str]:
    return frozenset(field.name for field in fields(params_class))
