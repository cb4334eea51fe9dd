"""Reading and checking LoRA `.safetensors` files without torch (nothing is unpickled).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range (plus an optional "__metadata__" map of strings),
then the tensor bytes.

`check_lora` decides whether a file is a LoRA this service can apply: diffusers/PEFT
LoRA (Linear) or LoCon (Conv2d) pairs on any Linear or Conv2d module of the SDXL UNet and
its two text encoders, finite, and shaped for the model. The model's module shapes come
from its configs (`lora_target_shapes`, which builds the models on torch's meta device:
no weights, no memory), so the web process checks an upload without loading any weights.
`unet_lora_target_shapes` lists the attention projections training targets, from the
UNet config alone.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file
from sdxl_engine.lora_keys import (
    ALPHA,
    COMPONENTS,
    DIFFUSERS,
    DOWN,
    PEFT,
    TEXT_ENCODERS,
    UNET,
    UP,
    factor_of,
    split_lora_key,
    unsupported_message,
)
from sdxl_engine.source import ModelConfig

# A module's weight shape: (out, in) for Linear, (out, in, kh, kw) for Conv2d.
Shape = tuple[int, ...]
# Component -> module path -> weight shape; a component mapped to None is one whose
# modules cannot be known (its LoRA pairs are then checked for consistency only).
TargetShapes = Mapping[str, Mapping[str, Shape] | None]
# A safetensors header as JSON: each tensor's entry ({"dtype", "shape", "data_offsets"}) by
# key, and the string metadata under "__metadata__".
Header = dict[str, Any]

_HEADER_LENGTH_BYTES = 8
_MIB = 1024 * 1024
# The safetensors library refuses headers above 100 MB. A LoRA's header, a few hundred KB
# even with every module of SDXL, may be at most 16 MB: refused before it is read.
_MAX_HEADER_BYTES = 16 * _MIB
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

# The prefix of this service's own entries in a LoRA file's header metadata.
METADATA_PREFIX = "sdxl_service."


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
    metadata: dict[str, str] = read_lora_header(Path(path)).get("__metadata__", {})
    return metadata


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


def unet_lora_target_shapes(unet_config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every attention projection a LoRA may target in a UNet2DConditionModel of this
    config, as module path -> (out_features, in_features), derived the way diffusers
    builds the model (SDXL's block types only).

    Raises EngineError for configs with other block types.
    """
    channels = list(unet_config["block_out_channels"])
    count = len(channels)

    def per_block(value: Any) -> list[Any]:
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

    def add_attentions(
        prefix: str, index: int, blocks: int, width: int, cross_dim: int, n_heads: int
    ) -> None:
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


def _layer_count(spec: int | list[int] | tuple[int, ...], layer: int) -> int:
    """Transformer blocks in one attention: an int for all layers, or one per layer."""
    return spec[layer] if isinstance(spec, list | tuple) else spec


def lora_target_shapes(
    unet_config: ModelConfig | None,
    text_encoder_config: ModelConfig | None = None,
    text_encoder_2_config: ModelConfig | None = None,
) -> dict[str, dict[str, Shape] | None]:
    """The weight shape of every Linear and Conv2d module of the Base UNet and the two text
    encoders built from these configs (diffusers' UNet2DConditionModel, transformers'
    CLIPTextModel and CLIPTextModelWithProjection), by component and module path; None for
    a component whose config is None or cannot be built. Imports torch; cached per config.
    """
    configs = zip(
        COMPONENTS, (unet_config, text_encoder_config, text_encoder_2_config), strict=True
    )
    return {
        component: None
        if config is None
        else _module_shapes(component, json.dumps(config, sort_keys=True))
        for component, config in configs
    }


@functools.lru_cache(maxsize=32)
def _module_shapes(component: str, config_json: str) -> dict[str, Shape] | None:
    import torch

    config: ModelConfig = json.loads(config_json)
    model: torch.nn.Module
    try:
        with torch.device("meta"):
            if component == UNET:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

                model = UNet2DConditionModel.from_config(config)
            else:
                from transformers import (
                    CLIPTextConfig,
                    CLIPTextModel,
                    CLIPTextModelWithProjection,
                )

                model_class = (
                    CLIPTextModel if component == TEXT_ENCODERS[0] else CLIPTextModelWithProjection
                )
                model = model_class(CLIPTextConfig.from_dict(config))
    except Exception:  # noqa: BLE001 - a config we cannot build: its modules are unknown
        return None
    return module_shapes(model)


def module_shapes(model: Any) -> dict[str, Shape]:
    """The weight shape of every Linear and Conv2d module of a torch `model`, by module path:
    what a LoRA of it may target (check_lora's target_shapes, per component)."""
    import torch

    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def check_lora(path: Path, target_shapes: TargetShapes | None = None) -> LoraInfo:
    """Checks that `path` is a LoRA or LoCon this service can apply to SDXL.

    Every tensor must be the down or up weight of a module under `unet.`, `text_encoder.` or
    `text_encoder_2.` (diffusers' or PEFT's spelling), in a float dtype, with each pair
    present and of one rank: a Linear module's down rank x in and up out x rank, a Conv2d
    module's down rank x in x kh x kw and up out x rank x 1 x 1; and every value finite.
    With `target_shapes` (from `lora_target_shapes`), each module must also exist in the
    model's component and the pair fit its weight. Raises EngineError naming the problems;
    returns the file's LoraInfo.
    """
    path = Path(path)
    header = read_lora_header(path)
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if not tensors:
        raise _not_a_lora(path, ["it holds no tensors"])
    problems: list[str] = []
    pairs: dict[tuple[str, str], dict[str, list[int]]] = {}
    for key, entry in sorted(tensors.items()):
        lora_key = split_lora_key(key)
        if lora_key is None:
            problems.append(unsupported_message(key))
            continue
        if not (
            lora_key.component is not None
            and lora_key.factor != ALPHA
            and lora_key.form in (DIFFUSERS, PEFT)
        ):
            problems.append(
                f"{key!r} is not a LoRA down/up weight under unet., text_encoder. or "
                "text_encoder_2. in diffusers' or PEFT's spelling"
            )
            continue
        if entry["dtype"] not in _FLOAT_DTYPES:
            problems.append(f"{key} has dtype {entry['dtype']}, not a float type")
            continue
        if len(entry["shape"]) not in (2, 4) or 0 in entry["shape"]:
            problems.append(
                f"{key} has shape {entry['shape']}, neither a Linear (2-D) nor a Conv2d "
                "(4-D) factor"
            )
            continue
        module_id, factor = (lora_key.component, lora_key.module), lora_key.factor
        if factor in pairs.setdefault(module_id, {}):
            problems.append(f"{_named(module_id)} has two {factor} weights")
        pairs[module_id][factor] = entry["shape"]
    for module_id, parts in sorted(pairs.items()):
        if set(parts) != {DOWN, UP}:
            missing = ({DOWN, UP} - set(parts)).pop()
            problems.append(f"{_named(module_id)} has no {missing} weight")
            continue
        problem = _pair_problem(module_id, parts[DOWN], parts[UP], target_shapes)
        if problem:
            problems.append(problem)
    if problems:
        raise _not_a_lora(path, problems)
    non_finite = _tensors_with_non_finite_values(path, header)
    if non_finite:
        raise _not_a_lora(path, [f"{key} holds NaN or infinite values" for key in non_finite])
    return inspect_lora_file(path)


def _pair_problem(
    module_id: tuple[str, str],
    down: list[int],
    up: list[int],
    target_shapes: TargetShapes | None,
) -> str | None:
    named = _named(module_id)
    if len(down) != len(up):
        return f"{named} has a {len(down)}-D down weight but a {len(up)}-D up weight"
    if down[0] != up[1]:
        return f"{named} has down rank {down[0]} but up rank {up[1]}"
    if len(up) == 4 and up[2:] != [1, 1]:
        return f"{named} has a {up[2]}x{up[3]} up kernel; a LoCon's up weight is 1x1"
    component, module = module_id
    shapes = None if target_shapes is None else target_shapes.get(component)
    if shapes is None:
        return None  # the model's modules are unknown here: consistency only
    expected = shapes.get(module)
    if expected is None:
        return f"{named} is no Linear or Conv2d module of this model's {component}"
    # The weight the pair adds to: up @ down, (out, in) then the down weight's kernel.
    found = (up[0], *down[1:])
    if tuple(found) == tuple(expected):
        return None
    kind = "Linear" if len(expected) == 2 else "Conv2d"
    return f"{named} adds a {_shape(found)} weight, but this model's {kind} is {_shape(expected)}"


def _named(module_id: tuple[str, str]) -> str:
    return ".".join(module_id)


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(dim) for dim in shape)


def _tensors_with_non_finite_values(path: Path, header: Header) -> list[str]:
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


def _not_a_lora(path: Path, problems: list[str]) -> EngineError:
    named = "; ".join(problems[:_MAX_PROBLEMS_NAMED])
    more = len(problems) - _MAX_PROBLEMS_NAMED
    return EngineError(
        f"{path.name} is not an SDXL LoRA this service can use: {named}"
        + (f" (and {more} more problems)" if more > 0 else "")
    )


def read_lora_header(path: Path) -> Header:
    """The checked JSON header: tensor entries by key, plus "__metadata__" if present.

    Raises EngineError naming the problem for a file that is no well-formed safetensors
    file: a header length beyond the file or beyond _MAX_HEADER_BYTES (refused before the
    header is read); a header that is not JSON, nests too deeply or is no object of tensor
    entries and string metadata; tensors whose data_offsets overlap, leave a gap, or leave
    bytes after the last tensor; and then anything the safetensors library itself refuses
    (its own reader, on numpy: no torch), in its words. Our checks come first so that the
    common problems are named plainly, and they hold whatever the installed library's
    version lets through; the library has the last word.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
            _check_header_length(path, header_length, size)
            header_bytes = handle.read(header_length)
    except OSError as error:
        raise EngineError(
            f"LoRA file {path.name} could not be read ({error.strerror or error})."
        ) from error
    header = _parsed_header(path, header_bytes)
    data_length = size - _HEADER_LENGTH_BYTES - header_length
    _check_entries(path, header, data_length)
    _check_data_layout(path, header, data_length)
    _check_with_the_safetensors_library(path)
    return header


def _check_header_length(path: Path, header_length: int, size: int) -> None:
    if size < _HEADER_LENGTH_BYTES:
        raise _malformed(path, f"it is {size} bytes, shorter than the 8-byte header length")
    if header_length > _MAX_HEADER_BYTES:
        raise _malformed(
            path,
            f"its header is {header_length:,} bytes; a LoRA's may be at most "
            f"{_MAX_HEADER_BYTES // _MIB} MB",
        )
    if header_length > size - _HEADER_LENGTH_BYTES:
        raise _malformed(
            path, f"its header length ({header_length:,} bytes) is larger than the file ({size:,})"
        )


def _parsed_header(path: Path, header_bytes: bytes) -> Header:
    try:
        header: object = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(path, "the header is not JSON") from error
    except ValueError as error:  # json's other refusal: an integer of over 4,300 digits
        raise _malformed(path, f"the header holds a number too long to read ({error})") from None
    except RecursionError:
        # Python's json raises it past the interpreter's recursion limit (about 1,000
        # levels); a safetensors header is 3 deep.
        raise _malformed(path, "its header nests arrays or objects too deeply") from None
    if not isinstance(header, dict):
        raise _malformed(path, "the header is not a JSON object")
    return header


def _check_entries(path: Path, header: Header, data_length: int) -> None:
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


def _check_data_layout(path: Path, header: Header, data_length: int) -> None:
    """The tensors' byte ranges follow one another from the data's first byte to its last,
    as the safetensors format requires: no byte belongs to two tensors, or to none."""
    ranges = sorted(
        (*entry["data_offsets"], key) for key, entry in header.items() if key != "__metadata__"
    )
    covered, previous = 0, None
    for start, end, key in ranges:
        if start < covered:
            raise _malformed(path, f"tensors {previous!r} and {key!r} overlap in data_offsets")
        if start > covered:
            raise _malformed(
                path,
                f"a gap in data_offsets: {start - covered:,} bytes before tensor {key!r} "
                "belong to no tensor",
            )
        covered, previous = end, key
    if covered < data_length:
        raise _malformed(
            path,
            f"{data_length - covered:,} trailing bytes after the last tensor belong to no tensor",
        )


def _check_with_the_safetensors_library(path: Path) -> None:
    """The safetensors library's own verdict: its reader (on numpy, so the web process needs
    no torch) opens the file, which parses and checks the header and maps the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as error:
        raise _malformed(path, f"the safetensors library refuses it: {error}") from None


def _byte_count_fits(entry: dict[str, Any]) -> bool:
    """A float tensor's byte range holds exactly its shape's values (other dtypes: unchecked)."""
    dtype = _FLOAT_DTYPES.get(entry["dtype"])
    if dtype is None:
        return True
    start: int
    end: int
    start, end = entry["data_offsets"]
    values: int = math.prod(entry["shape"])
    return end - start == values * dtype[0]


def _malformed(path: Path, detail: str) -> EngineError:
    return EngineError(
        f"{path.name} is not a readable safetensors file ({detail}); "
        "upload a LoRA saved as .safetensors."
    )
