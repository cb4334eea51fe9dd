from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from sdxl_engine.captioning import build_tiny_captioner, caption_images, load_captioner
from sdxl_engine.errors import EngineError

pytestmark = pytest.mark.one_pass


@pytest.fixture(scope="module")
def tiny_captioner_folder(tmp_path_factory) -> Path:
    return build_tiny_captioner(tmp_path_factory.mktemp("models") / "tiny-captioner")


def _photo(color: str, size: tuple[int, int] = (48, 40)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste("white", (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def test_the_tiny_captioner_is_a_blip_folder_that_loads_through_from_pretrained(
    tiny_captioner_folder,
):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    files = {path.name for path in tiny_captioner_folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert not list(tiny_captioner_folder.parent.glob(".building-*"))  # published by rename
    written = (tiny_captioner_folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_captioner(tiny_captioner_folder) == tiny_captioner_folder  # kept, not rebuilt
    assert (tiny_captioner_folder / "model.safetensors").stat().st_mtime_ns == written

    captioner = load_captioner(str(tiny_captioner_folder))

    assert isinstance(captioner.model, BlipForConditionalGeneration)
    assert isinstance(captioner.processor, BlipProcessor)
    assert captioner.image_side == 64  # the tiny processor's input size


def test_captions_are_words_the_same_for_the_same_image_and_take_the_prefix(
    tiny_captioner_folder,
):
    captioner = load_captioner(str(tiny_captioner_folder))
    red, blue = _photo("red"), _photo("blue", (40, 56))
    encoded = io.BytesIO()
    red.save(encoded, format="PNG")

    first = caption_images(captioner, [red, blue])
    again = caption_images(captioner, [encoded.getvalue(), blue])
    prefixed = caption_images(captioner, [red], prefix="  a photo of TOK,  ")
    cut = caption_images(captioner, [red], prefix="a photo of TOK,", max_chars=20)

    assert all(caption.strip() and caption == caption.strip() for caption in first), first
    assert "[" not in " ".join(first)  # no special token ([DEC], [SEP]) left in
    assert again == first  # greedy decoding; bytes read as the image they encode
    assert prefixed == [f"a photo of TOK, {first[0]}"]  # cog-sdxl's caption_prefix, a space
    assert len(cut[0]) <= 20 and prefixed[0].startswith(cut[0])
    assert prefixed[0][len(cut[0])] == " "  # cut at a word


def test_a_missing_model_or_an_unreadable_image_is_an_engine_error(tmp_path, tiny_captioner_folder):
    with pytest.raises(EngineError, match="does not exist"):
        load_captioner(str(tmp_path / "nowhere"))
    with pytest.raises(EngineError, match="cannot load the captioning model"):
        load_captioner(str(tmp_path))  # a folder, but no model in it
    captioner = load_captioner(str(tiny_captioner_folder))
    with pytest.raises(EngineError, match="could not be read"):
        caption_images(captioner, [b"not an image"])
