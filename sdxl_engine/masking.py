"""A training image's mask made automatically: around its faces, or over its subject.

White is the subject, black the rest; a mask is greyscale and lies over the photo as it is
seen: turned upright by its EXIF orientation, as a phone's photo is shown and as a person
draws a mask over it (sdxl_engine.dataset.mask_path_for; training turns the photo upright
too). A face on its side is not found, so detection looks at the upright photo as well.

- Faces: OpenCV's frontal-face Haar cascade, whose weights ship inside the opencv wheel,
  so it works offline and without torch. Each face becomes a filled ellipse enlarged past
  the detector's box to take in hair and chin, feathered with a Gaussian blur.
- Subjects: a CLIPSeg segmentation model (transformers' CLIPSegForImageSegmentation and
  CLIPSegProcessor) told what to segment by a text prompt, from a hub id or local folder
  (the service's SDXL_SUBJECT_MASK_MODEL). Its probabilities are thresholded, scaled to the
  image and feathered. With the tiny preset a tiny random CLIPSeg is built in the real
  on-disk format and loaded through the same from_pretrained calls: its masks are noise.

The service runs these in its web process on request, on the CPU. OpenCV, torch and
transformers are imported inside the functions that use them, so importing this module
(the API does, for its defaults) loads none of them; the segmentation model is loaded once
per process, and never onto CUDA (a process that initialises CUDA cannot fork safely, and
the web server forks).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from sdxl_engine.errors import EngineError
from sdxl_engine.faces import (
    FACE_ELLIPSE_HEIGHT,
    FACE_ELLIPSE_RAISE,
    FACE_ELLIPSE_WIDTH,
    face_boxes,
)
from sdxl_engine.files import build_folder_once
from sdxl_engine.source import RANDOM_PRESETS, planned_preset

if TYPE_CHECKING:
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

# --- Faces ---------------------------------------------------------------------------------
# Found as the face detail pass finds them (sdxl_engine.faces: the cascade and its settings).
# The Gaussian feather's sigma, as a fraction of the face box's width: soft enough that the
# loss weight fades over the hair rather than cutting a hard outline.
FACE_FEATHER = 0.1

# --- Subjects ------------------------------------------------------------------------------
# What a subject mask segments when the request names nothing: the service trains people.
DEFAULT_SUBJECT_PROMPT = "a person"
SUBJECT_MODEL_SETTING = "SDXL_SUBJECT_MASK_MODEL"
# A pixel is the subject where CLIPSeg's probability (the sigmoid of its logit) reaches this;
# an image is found to hold the subject when at least SUBJECT_MIN_AREA of it is.
SUBJECT_THRESHOLD = 0.4
SUBJECT_MIN_AREA = 0.01
# The model sees its own input size (352 for CLIPSeg); the image is shrunk to this longest
# side before its processor resizes it, so a huge photo costs no more than a large one.
SUBJECT_DETECTION_SIDE = 1024
# The Gaussian feather's sigma, as a fraction of the image's longest side: CLIPSeg's map is
# coarse (352 pixels), so its edge is blurred over about the size of one of its pixels.
SUBJECT_FEATHER = 0.01
# The tiny random segmenter's folder under the model cache (beside the tiny pipelines).
TINY_SEGMENTER_FOLDER = Path("tiny") / "subject-mask"
_TINY_SEGMENTER_IMAGE_SIDE = 64
# CLIP's image normalisation, which CLIPSeg's processor uses.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class FaceMask:
    faces: int  # how many faces were found
    mask: Image.Image | None  # None when none was


def face_mask(image: Image.Image) -> FaceMask:
    """A feathered ellipse around each face found in `image`, or no mask when none is."""
    import cv2

    upright = ImageOps.exif_transpose(image)
    boxes = face_boxes(upright)
    if not boxes:
        return FaceMask(faces=0, mask=None)
    mask = np.zeros((upright.height, upright.width), dtype=np.uint8)
    for x, y, width, height in boxes:
        centre = (round(x + width / 2), round(y + height / 2 - FACE_ELLIPSE_RAISE * height))
        axes = (round(width * FACE_ELLIPSE_WIDTH / 2), round(height * FACE_ELLIPSE_HEIGHT / 2))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, thickness=-1)
    sigma = FACE_FEATHER * float(np.mean([width for _, _, width, _ in boxes]))
    feathered = cv2.GaussianBlur(mask, (0, 0), sigma)
    return FaceMask(faces=len(boxes), mask=Image.fromarray(feathered, mode="L"))


# --- Subjects ------------------------------------------------------------------------------


def subject_mask_model(configured: str, preset: str | None, cache_dir: Path) -> str:
    """The segmentation model subject masks load: `configured` (SDXL_SUBJECT_MASK_MODEL, a
    hub id or local folder) when set, else with the tiny preset (SDXL_MODEL_PRESET, as a
    worker on this machine resolves it) the tiny random CLIPSeg, built once under
    `cache_dir`. Raises EngineError naming the setting when neither applies."""
    if configured.strip():
        return configured.strip()
    chosen = planned_preset(preset)
    if RANDOM_PRESETS.get(chosen) == "tiny":
        return str(build_random_segmenter(Path(cache_dir) / TINY_SEGMENTER_FOLDER))
    raise EngineError(
        f"subject masks need a segmentation model: set {SUBJECT_MODEL_SETTING} to a hub id "
        "or local folder of a CLIPSeg model (e.g. CIDAS/clipseg-rd64-refined); "
        "face masks need none"
    )


def build_random_segmenter(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight CLIPSeg (model, processor and tokenizer, as
    save_pretrained writes them) to `folder`, unless it is there already; returns `folder`.

    It appears through a single rename of a complete folder, so one that exists is whole
    and two processes building at once both end with the same one.
    """
    return build_folder_once(
        folder, lambda staging: _save_random_segmenter(staging, seed), _is_model_folder
    )


def _save_random_segmenter(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessorPil,
    )

    from sdxl_engine.generation.builder import write_clip_tokenizer

    # The tokenizer is written once to be read back; the processor saves it with the model.
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out.parent) as scratch:
        write_clip_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2}
    config = CLIPSegConfig(
        text_config={
            **tower,
            "num_hidden_layers": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **tower,
            "num_hidden_layers": 2,
            "image_size": _TINY_SEGMENTER_IMAGE_SIDE,
            "patch_size": 16,
        },
        projection_dim=16,
        extract_layers=(1,),
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    # transformers leaves the processor's __init__ unannotated.
    processor = CLIPSegProcessor(  # type: ignore[no-untyped-call]
        image_processor=ViTImageProcessorPil(
            size={"height": _TINY_SEGMENTER_IMAGE_SIDE, "width": _TINY_SEGMENTER_IMAGE_SIDE},
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def subject_mask(model: str, image: Image.Image, prompt: str) -> Image.Image | None:
    """The mask of what `prompt` names in `image`, by the segmentation model `model` (hub
    id or folder), or None when too little of the image (under SUBJECT_MIN_AREA) is it."""
    import cv2
    import torch

    segmenter, processor = load_segmenter(model)
    upright = ImageOps.exif_transpose(image)
    inputs = processor(
        text=[prompt],
        images=[_shrunk(upright.convert("RGB"), SUBJECT_DETECTION_SIDE)],
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        probability = segmenter(**inputs).logits[0].sigmoid().numpy()
    subject = (probability >= SUBJECT_THRESHOLD).astype(np.uint8) * 255
    if subject.mean() / 255 < SUBJECT_MIN_AREA:
        return None
    scaled = cv2.resize(subject, upright.size, interpolation=cv2.INTER_LINEAR)
    feathered = cv2.GaussianBlur(scaled, (0, 0), SUBJECT_FEATHER * max(upright.size))
    return Image.fromarray(feathered, mode="L")


@functools.lru_cache(maxsize=1)
def load_segmenter(model: str) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """The segmentation model `model` (hub id or folder) and its processor, loaded once per
    process (the last one asked for is kept), on the CPU; EngineError when it will not
    load."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    try:
        segmenter = CLIPSegForImageSegmentation.from_pretrained(model)
        processor = CLIPSegProcessor.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise EngineError(
            f"{SUBJECT_MODEL_SETTING}={model!r} could not be loaded as a CLIPSeg model: {error}"
        ) from error
    return segmenter, processor  # from_pretrained leaves the model in eval mode


# --- Shared --------------------------------------------------------------------------------


def _shrunk(image: Image.Image, longest_side: int) -> Image.Image:
    """`image`, or a copy of it whose longest side is `longest_side`, if it is larger."""
    if max(image.size) <= longest_side:
        return image
    small = image.copy()
    small.thumbnail((longest_side, longest_side), Image.Resampling.BILINEAR)
    return small
