from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdxl_engine.dataset import (
    DEFAULT_CLASS_PROMPT,
    TrainingPair,
    class_prompts,
    find_training_pairs,
    training_captions,
)
from sdxl_engine.errors import EngineError


def _image(path: Path, caption: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, format="PNG")
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def test_finds_captioned_images_in_nested_folders(tmp_path: Path) -> None:
    _image(tmp_path / "0" / "0.png", "first\n")
    _image(tmp_path / "10" / "0.png", "tenth")
    _image(tmp_path / "2" / "0.JPG", "second, upper-case suffix")
    _image(tmp_path / "drop" / "deeper" / "cat.webp", "an operator's cat")
    _image(tmp_path / "drop" / "dog.jpeg", "a dog")
    _image(tmp_path / "drop" / "old.bmp", "a bitmap")
    _image(tmp_path / "3" / "0.png", None)  # no caption: not training data
    _image(tmp_path / "4" / "0.png.tmp", "half-written")
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "notes.txt").write_text("a caption without an image")

    pairs = find_training_pairs(tmp_path)

    assert [pair.image_path.relative_to(tmp_path).as_posix() for pair in pairs] == [
        "0/0.png",
        "2/0.JPG",
        "10/0.png",
        "drop/deeper/cat.webp",
        "drop/dog.jpeg",
        "drop/old.bmp",
    ]
    assert pairs[0].caption == "first"
    assert pairs[3].caption == "an operator's cat"


def test_missing_or_empty_folder_has_no_pairs(tmp_path: Path) -> None:
    assert find_training_pairs(tmp_path) == []
    assert find_training_pairs(tmp_path / "missing") == []


def _pairs(*captions: str) -> list[TrainingPair]:
    return [TrainingPair(Path(f"{index}/0.png"), caption) for index, caption in enumerate(captions)]


def test_a_trigger_goes_before_each_caption_that_lacks_it_and_fills_an_empty_one() -> None:
    pairs = _pairs("a photo of a dog", "ohwx dog on a beach", "")

    assert training_captions(pairs, "ohwx") == [
        "ohwx, a photo of a dog",
        "ohwx dog on a beach",  # already there: left as written
        "ohwx",
    ]
    assert training_captions(pairs[:2], None) == ["a photo of a dog", "ohwx dog on a beach"]


def test_an_empty_caption_without_a_trigger_is_refused() -> None:
    refused = "empty caption: 2/0.png; caption them, or train with a trigger"
    with pytest.raises(EngineError, match=refused):
        training_captions(_pairs("a dog", "a cat", ""), None)


def test_the_class_prompt_is_each_caption_without_the_trigger_unless_one_is_given() -> None:
    pairs = _pairs("ohwx, a woman in a park", "a photo of ohwx woman", "ohwx", "", "a man , ohwx;")

    assert class_prompts(pairs, "ohwx", None) == [
        "a woman in a park",
        "a photo of woman",
        DEFAULT_CLASS_PROMPT,  # nothing left but the trigger
        DEFAULT_CLASS_PROMPT,
        "a man",  # the separators around the trigger go with it
    ]
    assert class_prompts(pairs, "ohwx", "a photo of a person") == ["a photo of a person"] * 5


def test_a_class_prompt_cannot_come_from_captions_without_a_trigger() -> None:
    # The captions are what the LoRA learns: keeping them as they were would undo it.
    with pytest.raises(EngineError, match="needs a class_prompt, or a trigger"):
        class_prompts(_pairs("a dog"), None, None)
    assert class_prompts(_pairs("a dog"), None, "a photo of a dog") == ["a photo of a dog"]


def _half_transparent(mode: str) -> Image.Image:
    """16×8: the left half transparent, stored as black (what most editors write); the
    right half opaque red (opaque grey in the grey modes)."""
    rgba = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (8, 0, 16, 8))
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    # A palette image whose black entry is its transparent colour.
    palette = Image.new("P", (16, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette.paste(1, (8, 0, 16, 8))
    palette.info["transparency"] = 0
    return palette


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_train_white_not_black(tmp_path: Path, mode: str) -> None:
    from sdxl_engine.training.caching import Sizing, _load_image

    path = tmp_path / "0" / "0.png"
    path.parent.mkdir()
    _half_transparent(mode).save(path, format="PNG")

    pixels, placement = _load_image(path, Sizing(buckets=[(16, 8)], multiple=8, max_upscale=1))

    assert placement.size == (16, 8) and tuple(pixels.shape) == (3, 8, 16)
    # In [-1, 1]: white is 1 on every channel; the opaque half keeps its colour.
    assert pixels[:, :, :8].min().item() == 1.0
    opaque = pixels[:, :, 8:].mean(dim=(1, 2)).tolist()
    if mode == "LA":
        assert opaque[0] == opaque[1] == opaque[2] < 0.0  # red's grey, not white
    else:
        assert opaque == [1.0, -1.0, -1.0]  # red


def test_an_opaque_image_trains_as_it_is(tmp_path: Path) -> None:
    from sdxl_engine.training.caching import Sizing, _load_image

    path = tmp_path / "0.png"
    Image.new("RGB", (16, 8), (0, 0, 0)).save(path, format="PNG")

    pixels, _ = _load_image(path, Sizing(buckets=[(16, 8)], multiple=8, max_upscale=1))

    assert pixels.max().item() == -1.0  # black stays black
