"""Applying a LoRA to the Base UNet by merging it into the weights, in place.

The stock way (`load_lora_weights` before a request, `unload_lora_weights` after) rebuilds
PEFT layers on every request and leaves them unfused while it runs: about a second to set
up and a slower step. Here the low-rank product `scale * alpha/rank * up @ down` is added
into each target weight in place, the UNet runs as it is, and afterwards each touched
weight is copied back from a saved original, so the next request sees the exact weights
of a freshly loaded model. The tensors stay where they are, so anything captured against
them (a compiled graph, a CUDA graph) stays valid.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdxl_engine.errors import EngineError

# Down/up factor suffixes in diffusers (old "lora.down"/"lora.up") and PEFT naming.
_FACTOR_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}
_UNET_PREFIX = "unet."
# LoRA files kept on the device between requests (a worker serves many sessions).
_CACHED_LORAS = 8


@dataclass(frozen=True)
class _Factor:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank


def is_unet_only(path: Path) -> bool:
    """True when every tensor of the file is a UNet LoRA factor this module can merge.

    A file that cannot be read is not: the PEFT path then reports what is wrong with it.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, SafetensorError):
        return False
    return bool(keys) and all(
        key.startswith(_UNET_PREFIX) and key.endswith(tuple(_FACTOR_SUFFIXES)) for key in keys
    )


class UNetLoraMerger:
    """Merges one LoRA at a time into a UNet's weights and restores them exactly."""

    def __init__(self, unet: torch.nn.Module):
        self._unet = unet
        self._modules = dict(unet.named_modules())
        self._originals: dict[str, torch.Tensor] = {}  # module name -> its untouched weight
        self._merged: list[str] = []
        self._factors: OrderedDict[tuple, dict[str, _Factor]] = OrderedDict()

    def merge(self, path: Path, scale: float = 1.0) -> None:
        """Adds the LoRA at `path`, times `scale`, into the weights (after restoring)."""
        self.restore()
        factors = self._load(Path(path))
        with torch.no_grad():
            for name, factor in factors.items():
                weight = self._modules[name].weight
                original = self._originals.get(name)
                if original is None:
                    original = self._originals[name] = weight.detach().clone()
                delta = _low_rank_product(factor, weight.shape) * (scale * factor.scale)
                weight.copy_((original.float() + delta).to(weight.dtype))
                self._merged.append(name)

    def restore(self) -> None:
        """Puts back the original weight of every module the last merge touched."""
        with torch.no_grad():
            for name in self._merged:
                self._modules[name].weight.copy_(self._originals[name])
        self._merged.clear()

    def _load(self, path: Path) -> dict[str, _Factor]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]
        factors = self._read(path)
        self._factors[key] = factors
        if len(self._factors) > _CACHED_LORAS:
            self._factors.popitem(last=False)
        return factors

    def _read(self, path: Path) -> dict[str, _Factor]:
        weight = next(self._unet.parameters())
        halves: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            alpha_for = _alpha_lookup(handle.metadata() or {})
            for key in handle.keys():
                suffix = next(s for s in _FACTOR_SUFFIXES if key.endswith(s))
                name = key[len(_UNET_PREFIX) : -len(suffix)]
                if name not in self._modules or not hasattr(self._modules[name], "weight"):
                    raise EngineError(
                        f"LoRA {path.name} names {name}, which this SDXL base model does not "
                        "have; it was made for another model"
                    )
                tensor = handle.get_tensor(key).to(weight.device, torch.float32)
                halves.setdefault(name, {})[_FACTOR_SUFFIXES[suffix]] = tensor
        factors = {}
        for name, pair in halves.items():
            if set(pair) != {"down", "up"}:
                raise EngineError(f"LoRA {path.name} has only half of the pair for {name}")
            rank = pair["down"].shape[0]
            factors[name] = _Factor(pair["down"], pair["up"], alpha_for(name, rank) / rank)
        return factors


def _low_rank_product(factor: _Factor, shape: torch.Size) -> torch.Tensor:
    """`up @ down` shaped like the weight (a Linear's 2-D or a Conv2d's 4-D)."""
    product = factor.up.flatten(1) @ factor.down.flatten(1)
    if product.numel() != shape.numel():
        raise EngineError(
            f"a LoRA factor of shape {tuple(factor.up.shape)} x {tuple(factor.down.shape)} "
            f"does not fit a weight of shape {tuple(shape)}"
        )
    return product.reshape(shape)


def _alpha_lookup(metadata: dict[str, str]) -> Callable[[str, int], float]:
    """alpha for a module, from the PEFT adapter config diffusers writes into the header.

    Without one, alpha equals the rank (scale 1), as diffusers itself assumes.
    """
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        config = {}
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}

    def alpha_for(name: str, rank: int) -> float:
        for pattern, value in patterns.items():
            if name.endswith(pattern):
                return float(value)
        return float(alpha if alpha is not None else rank)

    return alpha_for
