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


def images_close(first: list, second: list, tolerance: int = 2) -> bool:
    """PIL images equal up to float rounding (each 8-bit value within `tolerance`): compiled
    kernels, a merged LoRA and PEFT's unmerged layers sum in other orders."""
    return all(
        np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= tolerance
        for a, b in zip(first, second, strict=True)
    )
