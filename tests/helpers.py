"""Small builders the tests share."""

import base64
import io

from PIL import Image


def image_bytes(image_format: str = "PNG", size: tuple[int, int] = (48, 40), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
