"""Reading LoRA `.safetensors` files without loading their tensors (and without torch).

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range (plus an optional "__metadata__" map of strings),
then the tensor bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file

_HEADER_LENGTH_BYTES = 8
# The safetensors library refuses headers above 100 MB; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000
# The down-projection of each LoRA pair, in PEFT, diffusers and kohya naming; its first
# dimension is the rank.
_DOWN_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")


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
    ranks = {
        entry["shape"][0]
        for key, entry in tensors.items()
        if key.endswith(_DOWN_WEIGHT_SUFFIXES) and entry["shape"]
    }
    return LoraInfo(
        path=path,
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
        key_count=len(tensors),
        rank=ranks.pop() if len(ranks) == 1 else None,
        metadata=header.get("__metadata__", {}),
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
        ):
            raise _malformed(path, f"tensor {key!r} has an invalid entry")


def _malformed(path: Path, detail: str) -> EngineError:
    return EngineError(
        f"{path.name} is not a readable safetensors file ({detail}); "
        "upload a LoRA saved as .safetensors."
    )
