"""The face detail pass's image work (ADetailer's flow, Bing-su/adetailer, over A1111's
"inpaint only masked"), without torch: where the faces are, which square of the image
each is redone in, and how the redone square goes back. sdxl_engine.generation.faces runs
the img2img in between.

- Faces: OpenCV's frontal-face Haar cascade (face_boxes), whose weights ship in the opencv
  wheel, so this works offline; the face masks of training images (sdxl_engine.masking)
  find them with it too. Largest first. The cascade boxes eyebrows to mouth; a face here
  is the box around the ellipse masking draws from it (forehead and chin included), as
  ADetailer's face models box a whole face.
- The mask: the face's box grown by FACE_DILATE pixels (ADetailer's ad_dilate_erode) and
  blurred as A1111 blurs an inpainting mask (`mask_blur` = FACE_MASK_BLUR: a Gaussian of
  that sigma over a kernel of 2 x int(2.5 x blur + 0.5) + 1 pixels), in image pixels.
- The crop: the mask's extent grown by `padding` on every side (A1111's
  `inpaint_full_res_padding`, ADetailer's ad_inpaint_only_masked_padding), then to a
  square (the native size's aspect, as A1111 grows the region to the processing size's),
  moved inside the image where it would cross an edge.
- Back in: the redone square, resized to the crop, replaces the image through the mask:
  where the mask is 0 (away from the face) every pixel stays exactly as it was.

No torch: OpenCV (imported inside the functions, so importing this module loads none of
it), numpy and Pillow.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdxl_engine.parameters import FACE_DETAIL_MODEL, FACE_DILATE, FACE_MASK_BLUR

# OpenCV's frontal-face cascade, in the folder cv2.data.haarcascades.
FACE_CASCADE = FACE_DETAIL_MODEL
# Faces are looked for in a copy whose longest side is at most this: a 24-megapixel phone
# photo costs what a 1024-pixel one does, and a face too small to find at this size is too
# small to matter for a LoRA.
FACE_DETECTION_SIDE = 1024
# The cascade's settings, tuned on scikit-image's astronaut() (exactly her face) and on
# textures (brick, gravel, grass, noise, a gradient: nothing; nor in coffee, chelsea the
# cat, rocket): a window grows 10% per scale, a face needs 5 overlapping hits, and is at
# least 1/20 of the image's shorter side.
FACE_SCALE_STEP = 1.1
FACE_MIN_NEIGHBOURS = 5
FACE_MIN_SIDE_FRACTION = 1 / 20
# The cascade's box runs from the eyebrows to the mouth: the ellipse is 1.3 times its width
# and 1.6 times its height, its centre raised by 10% of the height, so it reaches 0.4 box
# heights above the box (forehead, hair line) and 0.2 below it (the chin).
FACE_ELLIPSE_WIDTH = 1.3
FACE_ELLIPSE_HEIGHT = 1.6
FACE_ELLIPSE_RAISE = 0.1
# (left, top, right, bottom) in pixels, right and bottom exclusive: PIL's crop box.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class FaceRegion:
    """One face of an image: where it is, the square it is redone in, and the feathered
    mask (the image's size, mode "L") through which the redone square goes back."""

    face: Box
    crop: Box
    mask: Image.Image


def face_boxes(upright: Image.Image) -> list[tuple[float, float, float, float]]:
    """(x, y, width, height) of each face, in `upright`'s pixels, the largest first. The
    box runs from the eyebrows to the mouth (FACE_ELLIPSE_* say how far a face reaches)."""
    import cv2
    from cv2.data import haarcascades  # cv2's type stubs leave out its `data` module

    grey_image = upright.convert("L")
    if max(grey_image.size) > FACE_DETECTION_SIDE:
        grey_image.thumbnail((FACE_DETECTION_SIDE, FACE_DETECTION_SIDE), Image.Resampling.BILINEAR)
    grey = np.asarray(grey_image)
    scale = upright.width / grey.shape[1]
    # Equalised, so a dim or washed-out photo's face has the contrast the cascade learnt on.
    grey = cv2.equalizeHist(grey)
    min_side = max(1, round(min(grey.shape) * FACE_MIN_SIDE_FRACTION))
    detector = cv2.CascadeClassifier(os.path.join(haarcascades, FACE_CASCADE))
    found = detector.detectMultiScale(
        grey,
        scaleFactor=FACE_SCALE_STEP,
        minNeighbors=FACE_MIN_NEIGHBOURS,
        minSize=(min_side, min_side),
    )
    boxes = [
        (float(x * scale), float(y * scale), float(w * scale), float(h * scale))
        for x, y, w, h in found
    ]
    return sorted(boxes, key=lambda box: box[2] * box[3], reverse=True)


def find_faces(image: Image.Image, max_faces: int) -> list[Box]:
    """The faces in `image`, whole-face boxes within the image, the largest first, at
    most `max_faces` (ADetailer's "mask only top k" by area)."""
    width, height = image.size
    faces = []
    for x, y, w, h in face_boxes(image)[:max_faces]:
        centre_x = x + w / 2
        centre_y = y + h / 2 - FACE_ELLIPSE_RAISE * h
        half_width = w * FACE_ELLIPSE_WIDTH / 2
        half_height = h * FACE_ELLIPSE_HEIGHT / 2
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
