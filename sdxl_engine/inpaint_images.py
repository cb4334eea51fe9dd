"""Inpainting's and outpainting's pixel work, without torch: reading and blurring masks,
filling the masked area, growing the canvas, the "only masked" crop region and pasting the
result back. The service checks masks with it (mask_problem); the engine
(sdxl_engine.generation.inpaint) builds each request's images with the rest.

Images are uint8 RGB arrays (height, width, 3); masks float32 arrays (height, width) from
0 to 1, where 1 (white) is repainted. The behaviour follows AUTOMATIC1111's img2img
(modules/processing.py StableDiffusionProcessingImg2Img.init, modules/masking.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# A mask pixel counts as white (repainted) from this grey up: the latent mask is rounded
# at 0.5 as A1111 rounds it.
WHITE_FROM = 128
# Masks' aspect ratio may differ from the init image's by this fraction (rounding of sizes).
ASPECT_TOLERANCE = 0.01
# A1111's fill (inpainting_fill 0): the masked area takes the colours around it, blurred
# at these radii (px) one after the other, each layer drawn this many times over the last.
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def open_rgb(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The encoded image as RGB at `size` (width, height), resized with Lanczos as the
    img2img path resizes its init image (diffusers' VaeImageProcessor)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).copy()


def open_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The encoded mask as grey levels 0..1 at `size` (white = repaint); an alpha channel
    is ignored (the colours are read, as A1111 reads its uploaded mask)."""
    with Image.open(io.BytesIO(data)) as image:
        grey = image.convert("RGB").convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(grey, dtype=np.float32) / 255.0


def mask_problem(mask: bytes, image_size: tuple[int, int]) -> str | None:
    """Why `mask` cannot mask an init image of `image_size` (width, height), or None: its
    aspect ratio must be the image's (within ASPECT_TOLERANCE), and something in it
    white (else nothing would be repainted)."""
    with Image.open(io.BytesIO(mask)) as image:
        width, height = image.size
        grey = np.asarray(image.convert("RGB").convert("L"))
    image_ratio = image_size[0] / image_size[1]
    if abs(width / height - image_ratio) > ASPECT_TOLERANCE * image_ratio:
        return (
            f"its aspect ratio ({width}x{height}) must be the init image's "
            f"({image_size[0]}x{image_size[1]})"
        )
    if not (grey >= WHITE_FROM).any():
        return "has nothing white: white marks what is repainted"
    return None


def mask_png(mask: bytes) -> bytes:
    """The mask as it is kept beside its generation: its grey levels (what open_mask
    reads) as a greyscale PNG, whatever format it came in."""
    with Image.open(io.BytesIO(mask)) as image:
        grey = image.convert("RGB").convert("L")
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    return buffer.getvalue()


def blur_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask blurred as A1111's mask_blur: a Gaussian of sigma `radius` px over a kernel
    of 2 x round(2.5 x radius) + 1, so its edge fades over about `radius` px each way."""
    if radius <= 0:
        return mask
    kernel = 2 * int(2.5 * radius + 0.5) + 1
    blurred: np.ndarray = np.clip(cv2.GaussianBlur(mask, (kernel, kernel), radius), 0.0, 1.0)
    return blurred


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with its masked area painted in the colours around it (A1111's "fill"):
    the unmasked pixels blurred wide (their colour spread over the hole, weighted by how
    much of each blur window is unmasked), then ever narrower blurs drawn over it, the
    last one the image itself outside the mask."""
    keep = (1.0 - np.round(mask)).astype(np.float32)[..., None]
    pixels = image.astype(np.float32)
    result: np.ndarray = np.zeros_like(pixels)
    alpha: np.ndarray = np.zeros_like(keep)
    for radius, repeats in _FILL_LAYERS:
        if radius:
            # Premultiplied blur: colour and coverage blurred alike, so masked pixels
            # (coverage 0) add no black.
            colour = cv2.GaussianBlur(pixels * keep, (0, 0), radius)
            cover = cv2.GaussianBlur(keep, (0, 0), radius)[..., None]
        else:
            colour, cover = pixels * keep, keep
        layer = np.where(cover > 1e-6, colour / np.maximum(cover, 1e-6), 0.0)
        for _ in range(repeats):
            # "Over" compositing of the layer on what is there.
            result = layer * cover + result * (1.0 - cover)
            alpha = cover + alpha * (1.0 - cover)
    filled = np.where(alpha > 1e-6, result / np.maximum(alpha, 1e-6), pixels)
    return np.clip(np.round(filled), 0, 255).astype(np.uint8)


def crop_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-black pixels, `padding` px wider on
    each side within the image (A1111's get_crop_region); None for a black mask."""
    ys, xs = np.nonzero(mask > 0)
    if not len(xs):
        return None
    height, width = mask.shape
    return (
        max(int(xs.min()) - padding, 0),
        max(int(ys.min()) - padding, 0),
        min(int(xs.max()) + 1 + padding, width),
        min(int(ys.max()) + 1 + padding, height),
    )


def expand_region(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """The crop box grown along one axis to the processing size's aspect ratio (`width` x
    `height`), centred, shifted back inside the image and clipped to it, as A1111's
    expand_crop_region."""
    x1, y1, x2, y2 = region

    def grow(low: int, high: int, wanted: float, limit: int) -> tuple[int, int]:
        extra = int(wanted - (high - low))
        low -= extra // 2
        high += extra - extra // 2
        if high >= limit:
            low -= high - limit
            high = limit
        if low < 0:
            high -= low
            low = 0
        return low, min(high, limit)

    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = grow(y1, y2, (x2 - x1) * height / width, image_height)
    else:
        x1, x2 = grow(x1, x2, (y2 - y1) * width / height, image_width)
    return x1, y1, x2, y2


@dataclass(frozen=True)
class Margins:
    left: int
    right: int
    top: int
    bottom: int


def outpaint_canvas(
    image: np.ndarray, margins: Margins, seam: int
) -> tuple[np.ndarray, np.ndarray]:
    """The image on a canvas grown by `margins`, and the canvas's (unblurred) mask.

    The new area is the image's edge pixels stretched outward (BORDER_REPLICATE), then
    blurred, so the sampler starts from the image's own colours rather than streaks. The
    mask is white on the new area and `seam` px into the image on each side that grew,
    so the join is repainted too (blur it with mask_blur before use)."""
    canvas = cv2.copyMakeBorder(
        image, margins.top, margins.bottom, margins.left, margins.right, cv2.BORDER_REPLICATE
    )
    height, width = canvas.shape[:2]
    new_area = np.ones((height, width), dtype=np.float32)
    new_area[margins.top : height - margins.bottom, margins.left : width - margins.right] = 0.0
    spread = max(margins.left, margins.right, margins.top, margins.bottom) / 4
    blurred = cv2.GaussianBlur(canvas, (0, 0), max(spread, 1.0))
    canvas = np.where(new_area[..., None] > 0, blurred, canvas).astype(np.uint8)
    mask = new_area.copy()
    inner_height, inner_width = image.shape[:2]
    top, left = margins.top, margins.left
    if margins.left:
        mask[top : top + inner_height, left : left + seam] = 1.0
    if margins.right:
        mask[top : top + inner_height, left + inner_width - seam : left + inner_width] = 1.0
    if margins.top:
        mask[top : top + seam, left : left + inner_width] = 1.0
    if margins.bottom:
        mask[top + inner_height - seam : top + inner_height, left : left + inner_width] = 1.0
    return canvas, mask


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB image or a mask at `size` (width, height), Lanczos (A1111's resize_image)."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    if image.dtype == np.uint8:
        resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
        return np.asarray(resized, dtype=np.uint8).copy()
    grey = Image.fromarray(np.round(image * 255).astype(np.uint8))
    return np.asarray(grey.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def overlay(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's apply_overlay: the original where the mask is black, the generated image
    where it is white, blended between: original x (1 - m) + generated x m."""
    weight = mask[..., None]
    blended = original.astype(np.float32) * (1.0 - weight) + generated.astype(np.float32) * weight
    pixels: np.ndarray = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return pixels


def paste_region(
    original: np.ndarray,
    generated: np.ndarray,
    region: tuple[int, int, int, int],
    mask: np.ndarray,
) -> np.ndarray:
    """ "Only masked": the generated crop resized back to its `region` of the original,
    and blended in with the (blurred) full-size mask."""
    x1, y1, x2, y2 = region
    pasted = original.copy()
    pasted[y1:y2, x1:x2] = resize(generated, (x2 - x1, y2 - y1))
    return overlay(original, pasted, mask)
