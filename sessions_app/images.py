"""Checks that an uploaded image decodes before anything is written, and keeps its format;
a mask, that it fits its image, and how it is stored."""

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
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
    """Decodes the whole image once (within the process's decode budget); raises
    ServiceError (400) if it is not a usable image.

    Only the four accepted formats' parsers ever see the bytes (Pillow would otherwise try
    every format it knows, EPS through Ghostscript included), and the pixel count is read
    from the header and checked before a single pixel is decoded.
    """
    with decoded(data, field) as image:
        width, height = image.size
        return CheckedImage(
            data=data,
            image_format=image.format or "",
            extension=ACCEPTED_FORMATS[image.format or ""],
            width=width,
            height=height,
            upright_size=upright_size(image),
        )


def image_pixels(data: bytes, field: str) -> int:
    """The image's width x height from its header (nothing is decoded), once it is known
    to be an accepted format within SDXL_MAX_UPLOAD_PIXELS (ServiceError, 400, otherwise)."""
    with _opened(data, field) as image:
        width, height = image.size
        return width * height


def check_total_pixels(uploads: list[tuple[str, bytes]]) -> None:
    """Refuses (400) a request whose images (name, bytes), read from their headers before
    any is decoded, hold more than SDXL_MAX_UPLOAD_TOTAL_PIXELS in all: each image within
    the per-image limit still costs its decoding, and a few MB of zip can hold hundreds."""
    limit: int = settings.SDXL_MAX_UPLOAD_TOTAL_PIXELS
    total = sum(image_pixels(data, name) for name, data in uploads)
    if total > limit:
        raise ServiceError(
            f"the {len(uploads)} images sent hold {total} pixels in all, more than the limit "
            f"of {limit} (SDXL_MAX_UPLOAD_TOTAL_PIXELS): send them in several requests"
        )


@contextmanager
def decoded(data: bytes, field: str) -> Iterator[Image.Image]:
    """The image, decoded, for the time of the `with`: its header checked first (formats,
    SDXL_MAX_UPLOAD_PIXELS), its pixels held against the process's decode budget until
    the `with` ends. A decoding error is a 400 naming `field`."""
    with _opened(data, field) as image:
        width, height = image.size
        with decode_budget(width * height):
            with _refusals(field):
                image.load()
            yield image


@contextmanager
def _opened(data: bytes, field: str) -> Iterator[Image.Image]:
    """The image with only its header read, refused (400) unless it is one of the accepted
    formats within SDXL_MAX_UPLOAD_PIXELS."""
    with _refusals(field):
        image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    with image:
        if image.format not in ACCEPTED_FORMATS:  # only their parsers may open it
            raise ServiceError(NOT_AN_IMAGE.format(field=field))
        width, height = image.size
        limit: int = settings.SDXL_MAX_UPLOAD_PIXELS
        if width * height > limit:
            raise ServiceError(
                f"{field}: the image has more pixels than the limit of {limit} "
                f"(SDXL_MAX_UPLOAD_PIXELS): it is {width}x{height} ({width * height} pixels)"
            )
        yield image


@contextmanager
def _refusals(field: str) -> Iterator[None]:
    """Pillow's refusals of an image as a ServiceError (400) naming `field`."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns up to twice its limit: make it refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError(
            f"{field}: the image has more pixels than the limit of "
            f"{settings.SDXL_MAX_UPLOAD_PIXELS} (SDXL_MAX_UPLOAD_PIXELS)"
        ) from None
    except UnidentifiedImageError:
        raise ServiceError(NOT_AN_IMAGE.format(field=field)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ServiceError(f"{field}: the image could not be decoded: {error}") from None


# Pixels being decoded in this process now, against SDXL_DECODE_PIXEL_BUDGET.
_decoding = threading.Condition()
_pixels_decoding = 0
# How long a decode waits for the budget before the request is told to come back.
DECODE_WAIT_S = 30.0


@contextmanager
def decode_budget(pixels: int) -> Iterator[None]:
    """Holds `pixels` of the process's decode budget (SDXL_DECODE_PIXEL_BUDGET) for the
    `with`: a decoded image takes a few bytes a pixel, so 16 threads decoding large images
    at once would take gigabytes; past the budget a decode waits for others to finish, and
    after DECODE_WAIT_S answers 503. An image larger than the whole budget decodes alone."""
    global _pixels_decoding
    budget: int = settings.SDXL_DECODE_PIXEL_BUDGET
    with _decoding:
        fits = _decoding.wait_for(
            lambda: _pixels_decoding == 0 or _pixels_decoding + pixels <= budget, DECODE_WAIT_S
        )
        if not fits:
            raise ServiceError(
                "the server is decoding other large images: try again in a few seconds",
                status=503,
                retry_after=5,
            )
        _pixels_decoding += pixels
    try:
        yield
    finally:
        with _decoding:
            _pixels_decoding -= pixels
            _decoding.notify_all()


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


def open_mask(data: bytes, field: str = "mask") -> AbstractContextManager[Image.Image]:
    """Uploaded mask bytes, decoded for the time of the `with` (as `decoded`): any format
    check_image accepts, within the same pixel limit (ServiceError, 400, naming `field`
    otherwise)."""
    return decoded(data, field)


def checked_mask(data: bytes, width: int, height: int, field: str = "mask") -> bytes:
    """Uploaded mask bytes as mask_png stores them for an image of `width` x `height`."""
    with open_mask(data, field) as mask:
        return mask_png(mask, width, height, field)
