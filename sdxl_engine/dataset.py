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


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a palette or grey image with a transparent colour."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in image.info)


def training_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB as it trains: one with transparency (an alpha channel, or a
    palette or grey image with a transparent colour) composited onto white first."""
    if not _has_alpha(image):
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


def alpha_mask(image: Image.Image) -> Image.Image:
    """The image's own alpha as a greyscale mask (kohya's alpha_mask): opaque is the
    subject, transparent the background; an image without transparency is all subject."""
    if not _has_alpha(image):
        return Image.new("L", image.size, 255)
    return image.convert("RGBA").getchannel("A")


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


def mask_problem(pairs: list[TrainingPair], masked_loss: bool, use_alpha_mask: bool) -> str | None:
    """Why a run with these settings cannot train on `pairs`, or None: masked_loss with
    masks from files (not use_alpha_mask) when no image has one would train exactly as
    without masks, which is surely not what was meant."""
    if masked_loss and not use_alpha_mask and not any(pair.mask_path for pair in pairs):
        return (
            "masked_loss needs a mask for at least one image (a <name>_mask.png beside it, "
            "white on the subject), or use_alpha_mask to take each image's alpha channel; "
            "no image of the session has one"
        )
    return None


# The class prompt of an image whose caption is the trigger alone (prior preservation).
DEFAULT_CLASS_PROMPT = "a photo"
_SEPARATORS = re.compile(r"\s*([,;])(?:\s*[,;])*\s*")


def class_prompts(pairs: list[TrainingPair], trigger: str | None, given: str | None) -> list[str]:
    """The prompt whose prediction prior preservation keeps at the base model's, for each
    pair: `given` for every image when there is one; else the image's caption with the
    trigger taken out (the class the trigger's subject belongs to, as the caption words
    it: "sks, a woman in a park" keeps "a woman in a park" as it was), or
    DEFAULT_CLASS_PROMPT when nothing else is left.

    Without a trigger there is nothing to take out: the captions themselves are what the
    LoRA learns, so a class prompt must be given (EngineError otherwise).
    """
    if given is not None:
        return [given] * len(pairs)
    if trigger is None:
        raise EngineError(
            "prior_preservation_weight needs a class_prompt, or a trigger to take out of the "
            "captions"
        )
    return [_without(pair.caption, trigger) or DEFAULT_CLASS_PROMPT for pair in pairs]


def _without(caption: str, trigger: str) -> str:
    """`caption` with every `trigger` taken out, the separators left around it tidied."""
    text = " ".join(caption.replace(trigger, " ").split())
    text = _SEPARATORS.sub(lambda match: f"{match.group(1)} ", text)
    return text.strip(" ,;")


def held_out_indices(image_count: int, holdout: int) -> list[int]:
    """Which of `image_count` photos (in find_training_pairs' order) a run with
    `eval_holdout` = `holdout` withholds from training to measure its eval loss on: evenly
    spaced, the middle of each of `holdout` equal stretches, so the choice is the same for
    the same images and spans them rather than taking the first or the last uploads."""
    return evenly_spaced(image_count, holdout)


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` of the numbers 0 to `total` - 1, evenly spaced: the middle of each of `count`
    equal stretches (held-out photos, the photos and timesteps an eval loss is over)."""
    return [(2 * index + 1) * total // (2 * count) for index in range(count)]
