"""Finding a session's training images and their captions, and the captions they train with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdxl_engine.errors import EngineError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


# What transparent pixels of a training image become: a plain white background, never the
# colour a transparent pixel happens to store (black, mostly, which a LoRA would learn).
TRANSPARENT_BACKGROUND = (255, 255, 255)


def training_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB as it trains: one with transparency (an alpha channel, or a
    palette or grey image with a transparent colour) composited onto white first."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# A training image's mask lies beside it as `<stem>_mask.png` (the dataset zip's naming too):
# a greyscale image of the photo's size, white where the subject is, black elsewhere.
MASK_SUFFIX = "_mask"


def mask_path_for(image_path: Path) -> Path:
    """Where the mask of the training image at `image_path` is kept."""
    return image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}.png")


def is_mask_path(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


@dataclass(frozen=True)
class TrainingPair:
    image_path: Path
    caption: str
    mask_path: Path | None = None  # its mask (mask_path_for), when it has one


def find_training_pairs(folder: Path) -> list[TrainingPair]:
    """Every image in any sub-folder of `folder` that has a `.txt` caption of the same stem,
    with its mask when one lies beside it (mask_path_for; a mask is never an image itself).

    Images without a caption are not training data (an upload may still be in progress, or
    an operator left a stray file); half-written `*.tmp` files never match an image suffix.
    Sorted by path with numbers compared as numbers (`2/` before `10/`), so runs are
    reproducible. A missing folder has no pairs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pairs = []
    for image_path in folder.rglob("*"):
        if (
            image_path.suffix.lower() not in IMAGE_SUFFIXES
            or is_mask_path(image_path)
            or not image_path.is_file()
        ):
            continue
        caption_path = image_path.with_suffix(".txt")
        if not caption_path.is_file():
            continue
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        mask_path = mask_path_for(image_path)
        pairs.append(
            TrainingPair(
                image_path=image_path,
                caption=caption,
                mask_path=mask_path if mask_path.is_file() else None,
            )
        )
    pairs.sort(key=lambda pair: _natural_key(pair.image_path.relative_to(folder)))
    return pairs


def _natural_key(path: Path) -> tuple[list[list[tuple[int, int | str]]], str]:
    # (0, number) sorts before (1, text), so the key never compares an int with a str; the
    # plain path breaks ties such as "01.png" and "1.png".
    pieces = [
        [
            (0, int(piece)) if piece.isdecimal() else (1, piece)
            for piece in re.split(r"(\d+)", part)
            if piece
        ]
        for part in path.parts
    ]
    return pieces, path.as_posix()


def training_captions(pairs: list[TrainingPair], trigger: str | None) -> list[str]:
    """The caption each pair trains with: `trigger` first where the caption lacks it (as
    ai-toolkit and cog-sdxl put their trigger word or caption prefix), the trigger alone for
    an empty caption.

    Raises EngineError when an image has an empty caption and there is no trigger: it would
    train the LoRA on nothing in particular.
    """
    if trigger is None:
        # "3/0.png": uploads all name their image 0.png, in their group's folder.
        empty = [
            Path(pair.image_path.parent.name, pair.image_path.name).as_posix()
            for pair in pairs
            if not pair.caption
        ]
        if empty:
            shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
            raise EngineError(
                f"training images with an empty caption: {shown}; caption them, or train "
                "with a trigger"
            )
        return [pair.caption for pair in pairs]
    return [_with_trigger(pair.caption, trigger) for pair in pairs]


def _with_trigger(caption: str, trigger: str) -> str:
    if not caption:
        return trigger
    return caption if trigger in caption else f"{trigger}, {caption}"


def held_out_indices(image_count: int, holdout: int) -> list[int]:
    """Which of `image_count` photos (in find_training_pairs' order) a run with
    `eval_holdout` = `holdout` withholds from training to measure its eval loss on: evenly
    spaced, the middle of each of `holdout` equal stretches, so the choice is the same for
    the same images and spans them rather than taking the first or the last uploads."""
    return [(2 * index + 1) * image_count // (2 * holdout) for index in range(holdout)]
