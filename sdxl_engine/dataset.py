"""Finding a session's training images and their captions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


@dataclass(frozen=True)
class TrainingPair:
    image_path: Path
    caption: str


def find_training_pairs(folder: Path) -> list[TrainingPair]:
    """Every image in any sub-folder of `folder` that has a `.txt` caption of the same stem.

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
        if image_path.suffix.lower() not in IMAGE_SUFFIXES or not image_path.is_file():
            continue
        caption_path = image_path.with_suffix(".txt")
        if not caption_path.is_file():
            continue
        caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
        pairs.append(TrainingPair(image_path=image_path, caption=caption))
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
