"""What a training run saves at each checkpoint so that another process can continue it.

The resume state holds everything the loop's next step depends on that is not rebuilt
the same way from the run's settings: the float32 master weights of the LoRA, the
optimiser's moments, the learning-rate schedule's position, the noise generator's state
and the step reached. The rest is rebuilt identically: the images are encoded again with
the same seed (so the cached latents and the noise generator's draws up to the first
step repeat), and the batch order is replayed from its own seeded generator.

A state belongs to one run's settings and images (its fingerprint); one that does not
match is ignored, and the run starts over.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sdxl_engine.dataset import TrainingPair
from sdxl_engine.files import write_atomically
from sdxl_engine.parameters import TrainingParams

logger = logging.getLogger(__name__)

RESUME_STATE_NAME = "resume.pt"
# Settings that change what is watched, not what is trained: a run may resume with them
# changed.
_NOT_TRAINING = ("seed", "sample_every", "sample_prompts", "sample_seed", "checkpoint_every")


@dataclass
class ResumeState:
    fingerprint: str
    step: int
    total_steps: int
    seed: int
    loss: float
    masters: list[torch.Tensor]
    optimizer: dict[str, Any]  # their state_dict()s
    lr_scheduler: dict[str, Any]
    noise_generator: torch.Tensor


def run_fingerprint(
    params: TrainingParams,
    pairs: list[TrainingPair],
    captions: list[str],
    parent_sha256: str | None = None,
) -> str:
    """What a state must have been saved under to continue this run: its training settings,
    each image's path, size and caption, when the run's masks are files each mask's path
    and size (a mask added, removed or changed starts the run over), and the LoRA it
    continues (its parent's sha256), if any."""
    settings = {k: v for k, v in asdict(params).items() if k not in _NOT_TRAINING}
    masks_from_files = params.loss_masked and not params.use_alpha_mask
    images = [
        [
            str(pair.image_path),
            pair.image_path.stat().st_size,
            caption,
            *(_mask_identity(pair.mask_path) if masks_from_files else []),
        ]
        for pair, caption in zip(pairs, captions, strict=True)
    ]
    # A run without a parent keeps the fingerprint it had before parents existed.
    parent = {"parent_sha256": parent_sha256} if parent_sha256 is not None else {}
    text = json.dumps({"settings": settings, "images": images, **parent}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _mask_identity(mask_path: Path | None) -> list[object]:
    """What the fingerprint holds of an image's mask file: its path and size, or None."""
    if mask_path is None:
        return [None]
    return [str(mask_path), mask_path.stat().st_size]


def save_resume_state(state_dir: Path, state: ResumeState) -> None:
    """Writes the state atomically: a process killed meanwhile leaves the previous one."""
    buffer = io.BytesIO()
    torch.save(
        {
            **{k: v for k, v in asdict(state).items() if k != "masters"},
            "masters": [tensor.detach().cpu() for tensor in state.masters],
            "optimizer": _to_cpu(state.optimizer),
        },
        buffer,
    )
    data = buffer.getvalue()
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(state_dir / RESUME_STATE_NAME, lambda temp: temp.write_bytes(data))


def load_resume_state(state_dir: Path, fingerprint: str) -> ResumeState | None:
    """The state saved in `state_dir` for a run of this fingerprint, or None."""
    path = state_dir / RESUME_STATE_NAME
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = ResumeState(**saved)
    except (OSError, RuntimeError, TypeError, ValueError, EOFError) as error:
        logger.warning("resume state %s could not be read (%s); starting over", path, error)
        return None
    if state.fingerprint != fingerprint:
        logger.warning("resume state %s belongs to other settings or images; starting over", path)
        return None
    return state


def _to_cpu(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value
