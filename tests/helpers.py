"""Small builders the tests share."""

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A training run that takes seconds on the tiny model.
FAST_TRAINING = {"steps": 2, "resolution": 64, "batch_size": 2, "seed": 1}


def image_bytes(image_format: str = "PNG", size: tuple[int, int] = (48, 40), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of `width` x `height` black pixels: a few KB that decode to
    width x height bytes (Pillow keeps 1-bit images at a byte per pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 1000
    idat = b"".join(
        compressor.compress(row * min(rows_per_chunk, height - start))
        for start in range(0, height, rows_per_chunk)
    )
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def tiny_unet_lora_shapes() -> dict[str, tuple[int, int]]:
    """The attention projections of the tiny test model's Base UNet (what settings use)."""
    from sdxl_engine.lora_files import unet_lora_target_shapes

    config = Path(__file__).resolve().parent.parent / "sdxl_engine/configs/tiny/unet_base.json"
    return unet_lora_target_shapes(json.loads(config.read_text()))


def lora_bytes(
    shapes: dict[str, tuple[int, int]] | None = None, rank=2, seed=0, fill=None
) -> bytes:
    """A small valid safetensors LoRA (diffusers naming) for the tiny model's UNet."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out_features, in_features) in (shapes or tiny_unet_lora_shapes()).items():
        tensors[f"unet.{module}.lora.down.weight"] = rng.standard_normal(
            (rank, in_features), dtype=np.float32
        )
        tensors[f"unet.{module}.lora.up.weight"] = np.full(
            (out_features, rank), 0.0 if fill is None else fill, dtype=np.float32
        )
    return save(tensors)


def safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and the tensor bytes after it."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def safetensors_assembled(
    header: dict | bytes, tensor_bytes: bytes, header_length: int | None = None
) -> bytes:
    """A safetensors file built byte by byte: the 8-byte little-endian header length (the
    true one unless `header_length` makes it lie), the header, the tensor bytes."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return length.to_bytes(8, "little") + encoded + tensor_bytes


# A module of the tiny model's UNet: a LoRA of it alone uploads (hostile_lora's base).
ONE_TINY_MODULE = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}

# Each defect hostile_lora writes -> what its refusal names (issue 26: every one a 400).
HOSTILE_LORAS = {
    "overlapping data_offsets": "overlap in data_offsets",
    "100 KB of trailing bytes": "102,400 trailing bytes after the last tensor",
    "a gap between tensors": "a gap in data_offsets: 16 bytes before tensor",
    "a header length larger than the file": "is larger than the file",
    "a header of 200,000 nested [": "its header nests arrays or objects too deeply",
    "a 5,000-digit number in the header": "the header holds a number too long to read",
    "non-string metadata values": "its metadata is not a map of strings",
    "a 30 MB __metadata__": "a LoRA's may be at most 16 MB",
    "a 65 KB __metadata__": "its __metadata__ is 66,573 bytes of JSON; a LoRA's may hold at "
    "most 64 KB",
    "an adapter config of 60,000 nested [": "lora_adapter_metadata is not JSON it can read",
}


def hostile_lora(defect: str) -> bytes:
    """A LoRA file with one defect of HOSTILE_LORAS, built byte by byte from a good LoRA of
    ONE_TINY_MODULE (whose down and up weights, 2 x 64 and 64 x 2 floats, take 512 bytes
    each); the rest of the file is as the safetensors library writes it."""
    header, data = safetensors_parts(lora_bytes(shapes=ONE_TINY_MODULE))
    first, second = sorted(
        (key for key in header if key != "__metadata__"),
        key=lambda key: header[key]["data_offsets"],
    )
    if defect == "overlapping data_offsets":  # the second reads the first's bytes
        header[second]["data_offsets"] = header[first]["data_offsets"]
        return safetensors_assembled(header, data[:512])
    if defect == "100 KB of trailing bytes":
        return safetensors_assembled(header, data + bytes(100 * 1024))
    if defect == "a gap between tensors":
        header[second]["data_offsets"] = [512 + 16, 1024 + 16]
        return safetensors_assembled(header, data[:512] + bytes(16) + data[512:])
    if defect == "a header length larger than the file":
        encoded = json.dumps(header).encode()
        return safetensors_assembled(encoded, data, len(encoded) + len(data) + 1)
    if defect == "a header of 200,000 nested [":
        return safetensors_assembled(b"[" * 200_000, data)
    if defect == "a 5,000-digit number in the header":
        return safetensors_assembled(
            b'{"n": ' + b"1" * 5000 + b", " + json.dumps(header)[1:].encode(), data
        )
    metadata = {
        "non-string metadata values": {"steps": 1000, "note": "fine"},
        "a 30 MB __metadata__": {"notes": "x" * 30_000_000},
        "a 65 KB __metadata__": {"notes": "x" * (65 * 1024)},
        "an adapter config of 60,000 nested [": {"lora_adapter_metadata": "[" * 60_000},
    }[defect]
    return safetensors_assembled({"__metadata__": metadata, **header}, data)


def images_close(first: list, second: list, tolerance: int = 2) -> bool:
    """PIL images equal up to float rounding (each 8-bit value within `tolerance`): compiled
    kernels, a merged LoRA and PEFT's unmerged layers sum in other orders."""
    return all(
        np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= tolerance
        for a, b in zip(first, second, strict=True)
    )
