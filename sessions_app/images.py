"""Checks that an uploaded image decodes before anything is written, and keeps its format."""

import io
import warnings
from dataclasses import dataclass

from django.conf import settings
from PIL import Image, UnidentifiedImageError

from core.errors import ServiceError

# Pillow format name -> file extension written to disk.
ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}
NOT_AN_IMAGE = "{field} does not hold a PNG, JPEG, WebP or BMP image"


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # the bytes as uploaded: the file keeps its format and quality
    image_format: str
    extension: str
    width: int
    height: int


def check_image(data: bytes, field: str = "image_base64") -> CheckedImage:
    """Decodes the whole image once; raises ServiceError (400) if it is not a usable image.

    Only the four accepted formats' parsers ever see the bytes (Pillow would otherwise try
    every format it knows, EPS through Ghostscript included), and the pixel count is read
    from the header and checked before a single pixel is decoded.
    """
    too_large = (
        f"{field}: the image has more pixels than the limit of {settings.SDXL_MAX_UPLOAD_PIXELS} "
        "(SDXL_MAX_UPLOAD_PIXELS)"
    )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns up to twice its limit: make it refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:
                image_format = image.format
                if image_format not in ACCEPTED_FORMATS:  # only their parsers may open it
                    raise ServiceError(NOT_AN_IMAGE.format(field=field))
                width, height = image.size
                if width * height > settings.SDXL_MAX_UPLOAD_PIXELS:
                    raise ServiceError(f"{too_large}: it is {width}x{height}")
                image.load()
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError(too_large) from None
    except UnidentifiedImageError:
        raise ServiceError(NOT_AN_IMAGE.format(field=field)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ServiceError(f"{field}: the image could not be decoded: {error}") from None
    return CheckedImage(
        data=data,
        image_format=image_format,
        extension=ACCEPTED_FORMATS[image_format],
        width=width,
        height=height,
    )
