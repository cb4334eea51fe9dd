"""Checks that an uploaded image decodes before anything is written, and keeps its format."""

import io
import warnings
from dataclasses import dataclass

from django.conf import settings
from PIL import Image, UnidentifiedImageError

from sdxl_service.errors import ServiceError

# Pillow format name -> file extension written to disk.
ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # the bytes as uploaded: the file keeps its format and quality
    image_format: str
    extension: str
    width: int
    height: int


def check_image(data: bytes) -> CheckedImage:
    """Decodes the whole image once; raises ServiceError (400) if it is not a usable image."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns about large images below twice its own limit; any image
            # over our limit is refused before its pixels are decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                width, height = image.size
                if image_format not in ACCEPTED_FORMATS:
                    raise ServiceError(
                        f"image format {image_format or 'unknown'} is not accepted; "
                        "send PNG, JPEG, WebP or BMP"
                    )
                if width * height > settings.SDXL_MAX_UPLOAD_PIXELS:
                    raise ServiceError(
                        f"image is {width}x{height} pixels, more than the limit of "
                        f"{settings.SDXL_MAX_UPLOAD_PIXELS} pixels"
                    )
                image.load()
    except ServiceError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError("image_base64 does not hold a PNG, JPEG, WebP or BMP image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ServiceError(f"image could not be decoded: {error}") from None
    return CheckedImage(
        data=data,
        image_format=image_format,
        extension=ACCEPTED_FORMATS[image_format],
        width=width,
        height=height,
    )
