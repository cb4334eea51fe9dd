"""Checks that an uploaded image decodes before anything is written, and keeps its format;
a mask, that it fits its image, and how it is stored."""

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

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
    # The size as the photo is seen: width and height swapped when its EXIF orientation
    # turns it a quarter (a phone's portrait photo stored on its side). Masks have this size.
    upright_size: tuple[int, int]


# EXIF orientations that turn the stored pixels a quarter to show them (5 to 8).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def upright_size(image: Image.Image) -> tuple[int, int]:
    """`image`'s size as it is seen, turned upright by its EXIF orientation (read from the
    header: nothing is decoded)."""
    width, height = image.size
    if image.getexif().get(0x0112, 1) in _QUARTER_TURNS:
        return height, width
    return width, height


def stored_upright_size(path: Path) -> tuple[int, int]:
    """upright_size of the image file at `path`."""
    with Image.open(path) as image:
        return upright_size(image)


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
                seen = upright_size(image)
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
        upright_size=seen,
    )


def mask_png(mask: Image.Image, width: int, height: int, field: str = "mask") -> bytes:
    """`mask` as stored for an image seen at `width` x `height` (upright_size): a greyscale
    PNG of that size
    (white is the subject; a transparent pixel counts as black). Only the scale may differ
    from the image's (it is resized then); another aspect ratio is refused (400), and so is
    a mask with no subject at all: trained on, it would teach nothing."""
    mask_width, mask_height = mask.size
    # Within a pixel's rounding of the image's ratio, at the larger of the two sizes.
    slack = max(width, height, mask_width, mask_height)
    if abs(mask_width * height - mask_height * width) > slack:
        raise ServiceError(
            f"{field}: the mask is {mask_width}x{mask_height} and its image {width}x{height}: "
            "a mask needs its image's aspect ratio"
        )
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        grey = Image.alpha_composite(Image.new("RGBA", rgba.size, "black"), rgba).convert("L")
    else:
        grey = mask.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    if grey.getextrema()[1] == 0:
        raise ServiceError(
            f"{field}: the mask is entirely black (no subject): training on it would learn nothing"
        )
    encoded = io.BytesIO()
    grey.save(encoded, format="PNG")
    return encoded.getvalue()


def open_mask(data: bytes, field: str = "mask") -> Image.Image:
    """Uploaded mask bytes, decoded: any format check_image accepts, within the same pixel
    limit (ServiceError, 400, naming `field` otherwise)."""
    check_image(data, field=field)
    mask = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    mask.load()
    return mask


def checked_mask(data: bytes, width: int, height: int, field: str = "mask") -> bytes:
    """Uploaded mask bytes as mask_png stores them for an image of `width` x `height`."""
    with open_mask(data, field) as mask:
        return mask_png(mask, width, height, field)
