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

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_keys import DOWN, UNET, UP, LoraKey, lora_scales, split_lora_key

# LoRA files kept on the device between requests (a worker serves many sessions).
_CACHED_LORAS = 8
# Weights merged per batched product: bounds the float32 temporary (64 SDXL 1280x1280
# projections: 420 MB).
_MERGE_CHUNK = 64


@dataclass(frozen=True)
class _Group:
    """A LoRA's modules whose weights share a shape and rank: merged in one batched product."""

    names: tuple[str, ...]
    up: torch.Tensor  # (modules, out, rank), already multiplied by alpha / rank
    down: torch.Tensor  # (modules, rank, in) with a convolution's kernel folded into `in`


def is_unet_only(path: Path) -> bool:
    """True when every tensor of the file is a UNet LoRA factor this module can merge.

    A file that cannot be read is not: the PEFT path then reports what is wrong with it.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, SafetensorError):
        return False
    return bool(keys) and all(_is_unet_factor(split_lora_key(key)) for key in keys)


def _is_unet_factor(lora_key: LoraKey | None) -> bool:
    return lora_key is not None and lora_key.is_unet_factor


class UNetLoraMerger:
    """Merges one LoRA at a time into a UNet's weights and restores them exactly.

    Weights of one shape are merged together (one batched `original + up @ down` and one
    multi-tensor copy per chunk), and restored with one multi-tensor copy: a switch from
    one LoRA to another is a few dozen kernel launches, not thousands.
    """

    def __init__(self, unet: torch.nn.Module):
        self._unet = unet
        self._modules = dict(unet.named_modules())
        self._originals: dict[str, torch.Tensor] = {}  # module name -> its untouched weight
        self._merged: list[str] = []
        self._loras: OrderedDict[tuple, list[_Group]] = OrderedDict()

    def merge(self, path: Path, scale: float = 1.0) -> None:
        """Adds the LoRA at `path`, times `scale`, into the weights (after restoring)."""
        self.restore()
        groups = self._load(Path(path))
        with torch.no_grad():
            for group in groups:
                for start in range(0, len(group.names), _MERGE_CHUNK):
                    chunk = slice(start, start + _MERGE_CHUNK)
                    names = group.names[chunk]
                    weights = [self._weight(name) for name in names]
                    originals = torch.stack([self._original(name) for name in names])
                    merged = torch.baddbmm(
                        originals.float(), group.up[chunk], group.down[chunk], alpha=scale
                    )
                    torch._foreach_copy_(weights, list(merged.to(originals.dtype).unbind(0)))
                    self._merged.extend(names)

    def restore(self) -> None:
        """Puts back the original weight of every module the last merge touched."""
        if self._merged:
            with torch.no_grad():
                torch._foreach_copy_(
                    [self._weight(name) for name in self._merged],
                    [self._originals[name] for name in self._merged],
                )
            self._merged.clear()

    def _weight(self, name: str) -> torch.Tensor:
        """The module's weight as a 2-D view: a convolution's kernel folded into its input."""
        return self._modules[name].weight.flatten(1)

    def _original(self, name: str) -> torch.Tensor:
        if name not in self._originals:
            self._originals[name] = self._weight(name).detach().clone()
        return self._originals[name]

    def _load(self, path: Path) -> list[_Group]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._loras:
            self._loras.move_to_end(key)
            return self._loras[key]
        groups = self._read(path)
        self._loras[key] = groups
        if len(self._loras) > _CACHED_LORAS:
            self._loras.popitem(last=False)
        return groups

    def _read(self, path: Path) -> list[_Group]:
        device = next(self._unet.parameters()).device
        halves: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            scales = lora_scales(handle.metadata() or {})
            for key in handle.keys():
                lora_key = split_lora_key(key)
                if not _is_unet_factor(lora_key):
                    raise EngineError(f"LoRA {path.name} has {key}, which is no UNet LoRA weight")
                name = lora_key.module
                if name not in self._modules or not hasattr(self._modules[name], "weight"):
                    raise EngineError(
                        f"LoRA {path.name} names {name}, which this SDXL base model does not "
                        "have; it was made for another model"
                    )
                tensor = handle.get_tensor(key).to(device, torch.float32)
                halves.setdefault(name, {})[lora_key.factor] = tensor.flatten(1)
        by_shape: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for name, pair in sorted(halves.items()):
            if set(pair) != {DOWN, UP}:
                raise EngineError(f"LoRA {path.name} has only half of the pair for {name}")
            up, down = pair[UP], pair[DOWN]
            shape = tuple(self._weight(name).shape)
            rank = down.shape[0]
            if up.shape[1] != rank or (up.shape[0], down.shape[1]) != shape:
                raise EngineError(
                    f"LoRA {path.name}: the factors of {name} ({tuple(up.shape)} x "
                    f"{tuple(down.shape)}) do not fit its weight of shape {shape}"
                )
            up = up * scales.scale(UNET, name, rank)
            by_shape.setdefault((shape, rank), []).append((name, up, down))
        return [
            _Group(
                names=tuple(name for name, _, _ in members),
                up=torch.stack([up for _, up, _ in members]),
                down=torch.stack([down for _, _, down in members]),
            )
            for members in by_shape.values()
        ]
