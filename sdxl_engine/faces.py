"""The face detail pass's image work (ADetailer's flow, Bing-su/adetailer, over A1111's
"inpaint only masked"), without torch: where the faces are, which square of the image
each is redone in, and how the redone square goes back. sdxl_engine.generation.faces runs
the img2img in between.

- Faces: OpenCV's frontal-face Haar cascade, as the face masks of training images find
  them (masking.face_boxes: its weights ship in the opencv wheel, so this works offline),
  largest first. The cascade boxes eyebrows to mouth; a face here is the box around the
  ellipse masking draws from it (forehead and chin included), as ADetailer's face models
  box a whole face.
- The mask: the face's box grown by FACE_DILATE pixels (ADetailer's ad_dilate_erode) and
  blurred as A1111 blurs an inpainting mask (`mask_blur` = FACE_MASK_BLUR: a Gaussian of
  that sigma over a kernel of 2 x int(2.5 x blur + 0.5) + 1 pixels), in image pixels.
- The crop: the mask's extent grown by `padding` on every side (A1111's
  `inpaint_full_res_padding`, ADetailer's ad_inpaint_only_masked_padding), then to a
  square (the native size's aspect, as A1111 grows the region to the processing size's),
  moved inside the image where it would cross an edge.
- Back in: the redone square, resized to the crop, replaces the image through the mask:
  where the mask is 0 (away from the face) every pixel stays exactly as it was.

No torch: OpenCV (imported inside the functions, as masking does), numpy and Pillow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdxl_engine import masking
from sdxl_engine.parameters import FACE_DILATE, FACE_MASK_BLUR

# (left, top, right, bottom) in pixels, right and bottom exclusive: PIL's crop box.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class FaceRegion:
    """One face of an image: where it is, the square it is redone in, and the feathered
    mask (the image's size, mode "L") through which the redone square goes back."""

    face: Box
    crop: Box
    mask: Image.Image


def find_faces(image: Image.Image, max_faces: int) -> list[Box]:
    """The faces in `image`, whole-face boxes within the image, the largest first, at
    most `max_faces` (ADetailer's "mask only top k" by area)."""
    width, height = image.size
    faces = []
    for x, y, w, h in masking.face_boxes(image.convert("RGB"))[:max_faces]:
        centre_x = x + w / 2
        centre_y = y + h / 2 - masking.FACE_ELLIPSE_RAISE * h
        half_width = w * masking.FACE_ELLIPSE_WIDTH / 2
        half_height = h * masking.FACE_ELLIPSE_HEIGHT / 2
        faces.append(
            (
                max(0, int(np.floor(centre_x - half_width))),
                max(0, int(np.floor(centre_y - half_height))),
                min(width, int(np.ceil(centre_x + half_width))),
                min(height, int(np.ceil(centre_y + half_height))),
            )
        )
    return faces


def face_region(image_size: tuple[int, int], face: Box, padding: int) -> FaceRegion:
    """The square `face` is redone in, within an image of `image_size` (width, height),
    and its feathered mask (see the module's doc)."""
    import cv2

    width, height = image_size
    left, top, right, bottom = face
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[
        max(0, top - FACE_DILATE) : min(height, bottom + FACE_DILATE),
        max(0, left - FACE_DILATE) : min(width, right + FACE_DILATE),
    ] = 255
    kernel = 2 * int(2.5 * FACE_MASK_BLUR + 0.5) + 1
    feathered = cv2.GaussianBlur(mask, (kernel, kernel), FACE_MASK_BLUR)
    rows, columns = np.nonzero(feathered)
    reach = (
        max(0, int(columns.min()) - padding),
        max(0, int(rows.min()) - padding),
        min(width, int(columns.max()) + 1 + padding),
        min(height, int(rows.max()) + 1 + padding),
    )
    return FaceRegion(
        face=face, crop=_square_around(reach, width, height), mask=Image.fromarray(feathered, "L")
    )


def _square_around(box: Box, width: int, height: int) -> Box:
    """The smallest square holding `box`, moved inside a `width` x `height` image; where
    the image is narrower than the square, as much of it as the image has."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top)

    def span(start: int, end: int, limit: int) -> tuple[int, int]:
        length = min(side, limit)
        # Grown evenly on both sides, then moved back inside [0, limit): still holding
        # [start, end), which lies inside and is no longer than `length`.
        first = start - (length - (end - start)) // 2
        first = min(max(0, first), limit - length)
        return first, first + length

    new_left, new_right = span(left, right, width)
    new_top, new_bottom = span(top, bottom, height)
    return new_left, new_top, new_right, new_bottom


def face_crop(image: Image.Image, region: FaceRegion, side: int) -> bytes:
    """The region's square of `image` at `side` x `side` (the model's native size), as PNG
    bytes: the img2img request's init_image."""
    crop = image.convert("RGB").crop(region.crop)
    if crop.size != (side, side):
        crop = crop.resize((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    # Lossless and fast: the bytes are read back at once.
    crop.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def paste_face(image: Image.Image, region: FaceRegion, redone: Image.Image) -> Image.Image:
    """`image` with the redone square (any size: resized to the crop) blended in through
    the region's mask; a new image, pixels where the mask is 0 exactly `image`'s."""
    left, top, right, bottom = region.crop
    original = image.convert("RGB")
    scaled = redone.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS)
    blended = Image.composite(scaled, original.crop(region.crop), region.mask.crop(region.crop))
    result = original.copy()
    result.paste(blended, (left, top))
    return result
