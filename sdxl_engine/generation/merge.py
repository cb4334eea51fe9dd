"""Applying LoRAs to the Base by merging them into the weights, in place.

The stock way (`load_lora_weights` before a request, `unload_lora_weights` after) rebuilds
PEFT layers on every request and leaves them unfused while it runs: about a second to set
up and a slower step. Here each LoRA's low-rank product `scale * alpha/rank * up @ down` is
added into each target weight in place (several LoRAs add up), the models run as they
are, and afterwards each touched weight is copied back from a saved original, so the next
request sees the exact weights of a freshly loaded model. The tensors stay where they
are, so anything captured against them (a compiled graph, a CUDA graph) stays valid.

Every Linear and Conv2d module of the UNet and of both text encoders can be merged: a
convolution's LoRA (LoCon) has a down kernel (rank, in, kh, kw) and a 1x1 up kernel, whose
product is the kernel's change with its spatial dimensions folded into `in`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.lora_keys import DOWN, UP, split_lora_key

# LoRA files kept on the device between requests (a worker serves many sessions).
_CACHED_LORAS = 8
# Weights merged per batched product: bounds the float32 temporary (64 SDXL 1280x1280
# projections: 420 MB).
_MERGE_CHUNK = 64


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA file and the strength it is applied at (A1111's `<lora:name:scale>`)."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class _Group:
    """A LoRA's modules of one component whose weights share a shape and rank: merged in
    one batched product."""

    names: tuple[str, ...]
    up: torch.Tensor  # (modules, out, rank), already multiplied by alpha / rank
    down: torch.Tensor  # (modules, rank, in) with a convolution's kernel folded into `in`


class LoraMerger:
    """Merges LoRAs into the weights of named models ("unet", "text_encoder",
    "text_encoder_2") and restores them exactly.

    Weights of one shape are merged together (one batched `weight + up @ down` and one
    multi-tensor copy per chunk), and restored with one multi-tensor copy: a switch from
    one LoRA to another is a few dozen kernel launches, not thousands.
    """

    def __init__(self, models: Mapping[str, torch.nn.Module]) -> None:
        self._modules = {
            component: dict(model.named_modules()) for component, model in models.items()
        }
        self._device = next(next(iter(models.values())).parameters()).device
        # (component, module name) -> the untouched weight, saved on its first merge.
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self._merged: dict[str, dict[str, None]] = {component: {} for component in models}
        # (path, size, mtime) -> the file's groups, least recently used first.
        self._loras: OrderedDict[tuple[str, int, int], dict[str, list[_Group]]] = OrderedDict()

    def merge(self, loras: Sequence[AppliedLora], components: Iterable[str] | None = None) -> None:
        """Adds every LoRA of `loras`, each times its scale, into the weights of
        `components` (all by default), after restoring those. The parts of a file for
        other components are checked, not merged."""
        components = list(self._modules if components is None else components)
        self.restore(components)
        groups_of = [(self._load(Path(lora.path)), lora.scale) for lora in loras]
        with torch.no_grad():
            for groups, scale in groups_of:
                for component in components:
                    for group in groups.get(component, []):
                        self._merge_group(component, group, scale)

    def restore(self, components: Iterable[str] | None = None) -> None:
        """Puts back the original weight of every module the merges of `components` (all
        by default) touched."""
        for component in self._modules if components is None else components:
            merged = self._merged[component]
            if merged:
                with torch.no_grad():
                    torch._foreach_copy_(
                        [self._weight(component, name) for name in merged],
                        [self._originals[component, name] for name in merged],
                    )
                merged.clear()

    def _merge_group(self, component: str, group: _Group, scale: float) -> None:
        for start in range(0, len(group.names), _MERGE_CHUNK):
            chunk = slice(start, start + _MERGE_CHUNK)
            names = group.names[chunk]
            for name in names:
                self._save_original(component, name)
            weights = [self._weight(component, name) for name in names]
            # A module a LoRA before this one touched carries its change already.
            current = torch.stack([weight.flatten(1) for weight in weights])
            merged = torch.baddbmm(current.float(), group.up[chunk], group.down[chunk], alpha=scale)
            # view_as: a convolution's kernel gets its spatial dimensions back; copy_ then
            # writes them in the weight's own memory format (channels-last on CUDA).
            torch._foreach_copy_(
                weights,
                [
                    part.to(weight.dtype).view_as(weight)
                    for part, weight in zip(merged.unbind(0), weights, strict=True)
                ],
            )
            self._merged[component].update(dict.fromkeys(names))

    def _weight(self, component: str, name: str) -> torch.Tensor:
        weight: torch.Tensor = self._modules[component][name].weight
        return weight

    def _save_original(self, component: str, name: str) -> None:
        if (component, name) not in self._originals:
            self._originals[component, name] = self._weight(component, name).detach().clone()

    def _load(self, path: Path) -> dict[str, list[_Group]]:
        try:
            stat = path.stat()
        except OSError as error:
            raise EngineError(f"LoRA {path.name} could not be read ({error})") from error
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in self._loras:
            self._loras.move_to_end(key)
            return self._loras[key]
        groups = self._read(path)
        self._loras[key] = groups
        if len(self._loras) > _CACHED_LORAS:
            self._loras.popitem(last=False)
        return groups

    def _read(self, path: Path) -> dict[str, list[_Group]]:
        """The file's pairs by component, grouped by shape, scales folded into `up`.

        Any supported form is read (lora_formats.to_canonical): what the service stores
        is canonical already, and a file put into a session folder by hand is converted
        here the way an upload would be.
        """
        from safetensors.torch import load_file

        from sdxl_engine.lora_formats import to_canonical

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError, ValueError) as error:
            raise EngineError(f"LoRA {path.name} could not be read ({error})") from error
        canonical = to_canonical(tensors, read_lora_metadata(path))
        halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in canonical.items():
            lora_key = split_lora_key(key)
            # to_canonical's keys all name a component's down or up weight.
            assert lora_key is not None and lora_key.component is not None, key
            component, name = lora_key.component, lora_key.module
            module = self._modules.get(component, {}).get(name)
            if module is None or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                raise EngineError(
                    f"LoRA {path.name} names {component}.{name}, which this SDXL base model "
                    "does not have as a linear or convolution layer; it was made for another "
                    "model"
                )
            halves.setdefault((component, name), {})[lora_key.factor] = tensor.to(
                self._device, torch.float32
            )
        # (component, weight shape, rank) -> (module name, up, down) of each member
        by_shape: dict[
            tuple[str, tuple[int, ...], int], list[tuple[str, torch.Tensor, torch.Tensor]]
        ] = {}
        for (component, name), pair in sorted(halves.items()):
            if set(pair) != {DOWN, UP}:
                raise EngineError(f"LoRA {path.name} has only half of the pair for {name}")
            weight = self._weight(component, name)
            up, down = pair[UP], pair[DOWN]
            rank = down.shape[0]
            if not _factors_fit(weight.shape, up.shape, down.shape):
                raise EngineError(
                    f"LoRA {path.name}: the factors of {name} ({tuple(up.shape)} x "
                    f"{tuple(down.shape)}) do not fit its weight of shape {tuple(weight.shape)}"
                )
            shape = (component, tuple(weight.shape), rank)
            by_shape.setdefault(shape, []).append((name, up.flatten(1), down.flatten(1)))
        groups: dict[str, list[_Group]] = {}
        for (component, _, _), members in by_shape.items():
            groups.setdefault(component, []).append(
                _Group(
                    names=tuple(name for name, _, _ in members),
                    up=torch.stack([up for _, up, _ in members]),
                    down=torch.stack([down for _, _, down in members]),
                )
            )
        return groups


def _factors_fit(weight: torch.Size, up: torch.Size, down: torch.Size) -> bool:
    """Whether up (out, rank[, 1, 1]) @ down (rank, in[, kh, kw]) is the weight's shape; a
    2-D pair also fits a 1x1 convolution, as diffusers applies it."""
    rank = down[0]
    if tuple(up[:2]) != (weight[0], rank) or any(size != 1 for size in up[2:]):
        return False
    if len(down) == 2:
        return down[1] == weight[1:].numel() and all(size == 1 for size in weight[2:])
    return tuple(down[1:]) == tuple(weight[1:])
