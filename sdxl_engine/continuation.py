"""Continuing a LoRA: a run that starts from the weights of a LoRA file of its session (its
parent) instead of from fresh ones, read and checked here without torch, for the web
process (which refuses a parent that cannot be continued) and the worker alike.

kohya's sd-scripts does it with --network_weights (the network of --network_dim and
--network_alpha, or with --dim_from_weights of the file's own), ai-toolkit with its
network's pretrained_lora_path and OneTrainer with its LoRA base model (lora_model_name).
Here the run always takes the parent's own shape: its rank (one for every module, read
from the tensors' shapes), the modules it adapts, and its scale. A stored LoRA is always
at scale 1 (alpha equal to its rank: uploads are stored with their alphas folded into the
up-weights, sdxl_engine.lora_formats), so the continued adapter runs at alpha = rank
and computes exactly what the parent did. A parent with text-encoder modules continues
with its text encoders trained; one without may start text-encoder adapters afresh.

The new file's header names its parent (`sdxl_service.parent`, `sdxl_service.parent_sha256`)
and counts the steps of the whole chain (`sdxl_service.total_steps_cumulative`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_files import TargetShapes, check_lora, read_lora_header
from sdxl_engine.lora_keys import TEXT_ENCODERS, split_lora_key

CUMULATIVE_STEPS_METADATA_KEY = "sdxl_service.total_steps_cumulative"
# Where a parent's own steps are read from when it has no cumulative count: a checkpoint's
# step (its `steps` are its run's whole length), our trainer's steps, kohya's.
_STEPS_METADATA_KEYS = ("sdxl_service.checkpoint_step", "sdxl_service.steps", "ss_steps")


@dataclass(frozen=True)
class ParentLora:
    """A LoRA file a run continues, as checked: which file, its bytes' hash, its shape."""

    path: Path
    sha256: str
    rank: int
    components: frozenset[str]  # of lora_keys.COMPONENTS, those it has modules in
    cumulative_steps: int  # the steps that made it, its own ancestors' included

    @property
    def has_text_encoders(self) -> bool:
        return not self.components.isdisjoint(TEXT_ENCODERS)


def read_parent_lora(path: Path, target_shapes: TargetShapes | None = None) -> ParentLora:
    """The LoRA at `path` as a parent: checked as an upload is (lora_files.check_lora;
    against `target_shapes`, the model's modules, when given) and of one rank.
    Raises EngineError naming the file otherwise."""
    path = Path(path)
    info = check_lora(path, target_shapes)
    if info.rank is None:
        raise EngineError(
            f"{path.name} cannot be continued: its modules have different ranks, and a run "
            "trains one rank"
        )
    components = {
        lora_key.component
        for key in read_lora_header(path)
        if (lora_key := split_lora_key(key)) is not None and lora_key.component is not None
    }
    return ParentLora(
        path=path,
        sha256=info.sha256,
        rank=info.rank,
        components=frozenset(components),
        cumulative_steps=cumulative_steps(info.metadata),
    )


def cumulative_steps(metadata: dict[str, str]) -> int:
    """The steps that made a LoRA, from its header: its cumulative count when it has one,
    else its own steps, else 0 (a file that does not say, as most uploads)."""
    for key in (CUMULATIVE_STEPS_METADATA_KEY, *_STEPS_METADATA_KEYS):
        value = metadata.get(key, "")
        if value.isdecimal():
            return int(value)
    return 0


def parent_problems(parent: ParentLora, rank: int, train_text_encoder: bool) -> list[str]:
    """Why a run of this rank and text-encoder setting cannot continue `parent` (none: it
    can), each naming the file."""
    problems = []
    if rank != parent.rank:
        problems.append(
            f"rank {rank} differs from the rank {parent.rank} of {parent.path.name}, which "
            "the run continues (leave rank out to take it)"
        )
    if parent.has_text_encoders and not train_text_encoder:
        problems.append(
            f"{parent.path.name} has text-encoder modules: continuing it trains the text "
            "encoders too (leave train_text_encoder out, or set it true)"
        )
    return problems
