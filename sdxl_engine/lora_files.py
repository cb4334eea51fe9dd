"""Reading and checking LoRA `.safetensors` files without torch (nothing is unpickled).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range (plus an optional "__metadata__" map of strings),
then the tensor bytes.

`check_unet_lora` decides whether a file is a LoRA this service can apply: diffusers/PEFT
LoRA weights on the SDXL UNet's attention projections, finite, and shaped for the model.
The model's projection shapes come from its UNet config (`unet_lora_target_shapes`), so
the web process checks an upload without loading any weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file
from sdxl_engine.lora_keys import (
    DOWN,
    TARGET_PROJECTIONS,
    UP,
    factor_of,
    is_target_projection,
    split_lora_key,
)

_HEADER_LENGTH_BYTES = 8
# The safetensors library refuses headers above 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000
# Float dtypes a LoRA may hold -> (bytes per value, mask of the exponent bits). A value is
# NaN or infinite exactly when all its exponent bits are set, whatever its width.
_FLOAT_DTYPES = {
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "F32": (4, 0x7F800000),
    "F64": (8, 0x7FF0000000000000),
}
_UINT_OF_WIDTH = {2: "<u2", 4: "<u4", 8: "<u8"}
_MAX_PROBLEMS_NAMED = 3


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    size_bytes: int
    sha256: str
    key_count: int
    rank: int | None  # None when the file has no LoRA down-weights or their ranks differ
    metadata: dict[str, str]


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty if it has none)."""
    return read_lora_header(Path(path)).get("__metadata__", {})


def inspect_lora_file(path: Path) -> LoraInfo:
    """Size, hash, tensor count, rank and metadata of a safetensors file.

    Raises EngineError if the file is missing or not a well-formed safetensors file.
    """
    path = Path(path)
    header = read_lora_header(path)
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    # A down-weight's first dimension is its module's rank, in every form.
    ranks = {
        entry["shape"][0]
        for key, entry in tensors.items()
        if factor_of(key) == DOWN and entry["shape"]
    }
    return LoraInfo(
        path=path,
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
        key_count=len(tensors),
        rank=ranks.pop() if len(ranks) == 1 else None,
        metadata=header.get("__metadata__", {}),
    )


def unet_lora_target_shapes(unet_config: dict) -> dict[str, tuple[int, int]]:
    """Every attention projection a LoRA may target in a UNet2DConditionModel of this
    config, as module path -> (out_features, in_features), derived the way diffusers
    builds the model (SDXL's block types only).

    Raises EngineError for configs with other block types.
    """
    channels = list(unet_config["block_out_channels"])
    count = len(channels)

    def per_block(value) -> list:
        return list(value) if isinstance(value, list | tuple) else [value] * count

    layers = per_block(unet_config.get("layers_per_block", 2))
    transformer_layers = per_block(unet_config.get("transformer_layers_per_block", 1))
    cross_dims = per_block(unet_config.get("cross_attention_dim", 1280))
    # diffusers' naming slip: "attention_head_dim" holds the head count unless
    # num_attention_heads is given.
    heads = per_block(
        unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim", 8)
    )
    up_transformer_layers = unet_config.get("reverse_transformer_layers_per_block") or list(
        reversed(transformer_layers)
    )
    if unet_config.get("only_cross_attention") or unet_config.get("dual_cross_attention"):
        raise _unsupported("only_cross_attention or dual_cross_attention")

    shapes: dict[str, tuple[int, int]] = {}

    def add_attentions(prefix: str, index: int, blocks: int, width: int, cross_dim: int, n_heads):
        # Transformer2DModel's inner width: heads x (width // heads).
        inner = n_heads * (width // n_heads)
        for block in range(blocks):
            base = f"{prefix}.attentions.{index}.transformer_blocks.{block}"
            for attention, key_dim in (("attn1", inner), ("attn2", cross_dim)):
                shapes[f"{base}.{attention}.to_q"] = (inner, inner)
                shapes[f"{base}.{attention}.to_k"] = (inner, key_dim)
                shapes[f"{base}.{attention}.to_v"] = (inner, key_dim)
                shapes[f"{base}.{attention}.to_out.0"] = (inner, inner)

    for i, block_type in enumerate(unet_config["down_block_types"]):
        if block_type == "CrossAttnDownBlock2D":
            for layer in range(layers[i]):
                add_attentions(
                    f"down_blocks.{i}",
                    layer,
                    _layer_count(transformer_layers[i], layer),
                    channels[i],
                    cross_dims[i],
                    heads[i],
                )
        elif block_type != "DownBlock2D":
            raise _unsupported(f"down block type {block_type}")
    mid_type = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        add_attentions(
            "mid_block",
            0,
            _layer_count(transformer_layers[-1], 0),
            channels[-1],
            cross_dims[-1],
            heads[-1],
        )
    elif mid_type is not None:
        raise _unsupported(f"mid block type {mid_type}")
    up_channels, up_layers = list(reversed(channels)), list(reversed(layers))
    up_cross_dims, up_heads = list(reversed(cross_dims)), list(reversed(heads))
    for i, block_type in enumerate(unet_config["up_block_types"]):
        if block_type == "CrossAttnUpBlock2D":
            for layer in range(up_layers[i] + 1):
                add_attentions(
                    f"up_blocks.{i}",
                    layer,
                    _layer_count(up_transformer_layers[i], layer),
                    up_channels[i],
                    up_cross_dims[i],
                    up_heads[i],
                )
        elif block_type != "UpBlock2D":
            raise _unsupported(f"up block type {block_type}")
    return shapes


def _unsupported(feature: str) -> EngineError:
    return EngineError(f"cannot tell the LoRA shapes of a UNet with {feature}")


def _layer_count(spec, layer: int) -> int:
    """Transformer blocks in one attention: an int for all layers, or one per layer."""
    return spec[layer] if isinstance(spec, list | tuple) else spec


def check_unet_lora(
    path: Path, target_shapes: Mapping[str, tuple[int, int]] | None = None
) -> LoraInfo:
    """Checks that `path` is a LoRA for the SDXL UNet's attention projections.

    Every tensor must be the down or up weight of a `to_q`/`to_k`/`to_v`/`to_out.0`
    projection under `unet.`, in a float dtype, with each pair present and of one rank
    (down: rank x in, up: out x rank), and every value finite. With `target_shapes` (from
    `unet_lora_target_shapes`), each projection must also exist in the model with that
    (out, in) shape. Raises EngineError naming the problems; returns the file's LoraInfo.
    """
    path = Path(path)
    header = read_lora_header(path)
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if not tensors:
        raise _not_a_unet_lora(path, ["it holds no tensors"])
    problems: list[str] = []
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, entry in sorted(tensors.items()):
        lora_key = split_lora_key(key)
        if not (
            lora_key is not None
            and lora_key.is_unet_factor
            and is_target_projection(lora_key.module)
        ):
            problems.append(
                f"{key!r} is not a LoRA weight of a UNet attention projection "
                f"({', '.join(TARGET_PROJECTIONS)})"
            )
            continue
        if entry["dtype"] not in _FLOAT_DTYPES:
            problems.append(f"{key} has dtype {entry['dtype']}, not a float type")
            continue
        if len(entry["shape"]) != 2 or 0 in entry["shape"]:
            problems.append(f"{key} has shape {entry['shape']}, not a 2-D matrix")
            continue
        module, factor = lora_key.module, lora_key.factor
        if factor in pairs.setdefault(module, {}):
            problems.append(f"{module} has two {factor} weights")
        pairs[module][factor] = entry["shape"]
    for module, parts in sorted(pairs.items()):
        if set(parts) != {DOWN, UP}:
            missing = ({DOWN, UP} - set(parts)).pop()
            problems.append(f"{module} has no {missing} weight")
            continue
        (rank, in_features), (out_features, up_rank) = parts[DOWN], parts[UP]
        if rank != up_rank:
            problems.append(f"{module} has down rank {rank} but up rank {up_rank}")
        elif target_shapes is not None:
            expected = target_shapes.get(module)
            if expected is None:
                problems.append(f"{module} is not an attention projection of this model's UNet")
            elif (out_features, in_features) != expected:
                problems.append(
                    f"{module} maps {in_features} -> {out_features} features, but this "
                    f"model's projection maps {expected[1]} -> {expected[0]}"
                )
    if problems:
        raise _not_a_unet_lora(path, problems)
    non_finite = _tensors_with_non_finite_values(path, header)
    if non_finite:
        raise _not_a_unet_lora(path, [f"{key} holds NaN or infinite values" for key in non_finite])
    return inspect_lora_file(path)


def _tensors_with_non_finite_values(path: Path, header: dict) -> list[str]:
    found = []
    with open(path, "rb") as handle:
        data_start = _HEADER_LENGTH_BYTES + int.from_bytes(handle.read(8), "little")
        for key, entry in sorted(header.items()):
            if key == "__metadata__":
                continue
            width, exponent_mask = _FLOAT_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            handle.seek(data_start + start)
            values = np.frombuffer(handle.read(end - start), dtype=_UINT_OF_WIDTH[width])
            if np.any((values & np.array(exponent_mask, dtype=values.dtype)) == exponent_mask):
                found.append(key)
    return found


def _not_a_unet_lora(path: Path, problems: list[str]) -> EngineError:
    named = "; ".join(problems[:_MAX_PROBLEMS_NAMED])
    more = len(problems) - _MAX_PROBLEMS_NAMED
    return EngineError(
        f"{path.name} is not an SDXL UNet LoRA this service can use: {named}"
        + (f" (and {more} more problems)" if more > 0 else "")
    )


def read_lora_header(path: Path) -> dict:
    """The checked JSON header: tensor entries by key, plus "__metadata__" if present."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
            if size < _HEADER_LENGTH_BYTES or header_length > min(
                size - _HEADER_LENGTH_BYTES, _MAX_HEADER_BYTES
            ):
                raise _malformed(path, "the header length does not fit the file")
            header = json.loads(handle.read(header_length).decode("utf-8"))
    except OSError as error:
        raise EngineError(
            f"LoRA file {path.name} could not be read ({error.strerror or error})."
        ) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(path, "the header is not JSON") from error
    if not isinstance(header, dict):
        raise _malformed(path, "the header is not a JSON object")
    _check_entries(path, header, data_length=size - _HEADER_LENGTH_BYTES - header_length)
    return header


def _check_entries(path: Path, header: dict, data_length: int) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _malformed(path, "its metadata is not a map of strings")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(dim, int) and dim >= 0 for dim in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(offset, int) for offset in entry["data_offsets"])
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= data_length
            and _byte_count_fits(entry)
        ):
            raise _malformed(path, f"tensor {key!r} has an invalid entry")


def _byte_count_fits(entry: dict) -> bool:
    """A float tensor's byte range holds exactly its shape's values (other dtypes: unchecked)."""
    dtype = _FLOAT_DTYPES.get(entry["dtype"])
    if dtype is None:
        return True
    start, end = entry["data_offsets"]
    return end - start == math.prod(entry["shape"]) * dtype[0]


def _malformed(path: Path, detail: str) -> EngineError:
    return EngineError(
        f"{path.name} is not a readable safetensors file ({detail}); "
        "upload a LoRA saved as .safetensors."
    )
