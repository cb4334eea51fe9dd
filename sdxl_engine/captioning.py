"""Captions for training images from an image-to-text model (BLIP and its kind).

The model is any transformers captioner that AutoModelForImageTextToText and AutoProcessor
load from a hub id or a local folder with no remote code: BLIP
(BlipForConditionalGeneration + BlipProcessor, what cog-sdxl's preprocess.py captions
with) first of all. Florence-2's original checkpoints need `trust_remote_code`, which is
never turned on here (it runs code downloaded with the weights).

The web process captions on demand, so this module stays importable without torch: torch
and transformers are imported inside the functions that run the model, on the CPU only
(the web process forks, and a forked process cannot use CUDA initialised before).
build_tiny_captioner writes a random miniature BLIP for the tiny model preset, so the
whole path runs offline; its captions are random words.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from sdxl_engine.dataset import training_rgb
from sdxl_engine.errors import EngineError
from sdxl_engine.files import build_folder_once

if TYPE_CHECKING:
    from transformers import GenerationMixin, ProcessorMixin

# A BLIP caption is a dozen words; kohya's BLIP captioning stops at 75 tokens and
# cog-sdxl's BLIP-2 at 40 new ones. Bounded, as each token is a decoder pass on the CPU.
CAPTION_MAX_NEW_TOKENS = 40
# Images captioned per model call: a batch costs less per image than one at a time, and
# eight of BLIP's 384² inputs keep the memory small.
CAPTION_BATCH_IMAGES = 8
# The side the tiny captioner's images are resized to (the tiny SDXL's own native side).
TINY_IMAGE_SIDE = 64
# The tiny captioner's word list: its random captions are made of these (any order).
_TINY_WORDS = (
    "a an the of on in with and at near photo picture portrait person man woman face "
    "dog cat red blue green white black small large young old standing sitting smiling "
    "wall table tree sky street room window field shirt hair light dark"
).split()
_TINY_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


@dataclass(frozen=True)
class Captioner:
    """A loaded captioning model and the processor that prepares its images and reads
    its tokens."""

    model: GenerationMixin
    processor: ProcessorMixin
    # The longest side worth keeping before the processor resizes an image (its input
    # size): a phone photo is downscaled to it first, so the processor's resize is cheap.
    image_side: int


def load_captioner(model: str) -> Captioner:
    """The captioner at `model` (a hub id or a local folder), on the CPU in float32, in
    evaluation mode. Raises EngineError when it cannot be loaded as an image-to-text
    model (missing, not a captioner, or needing remote code)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if Path(model).is_absolute() and not Path(model).is_dir():
        raise EngineError(f"the captioning model's folder {model} does not exist")
    try:
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
        # float32 whatever the checkpoint stores: half precision is slow, or missing, on CPUs.
        loaded = AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as error:
        raise EngineError(f"cannot load the captioning model {model!r}: {error}") from error
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise EngineError(f"{model!r} has no image processor: it is not an image captioner")
    # from_pretrained, without a device_map, loads on the CPU and in evaluation mode.
    return Captioner(loaded, processor, _input_side(image_processor))


def caption_images(
    captioner: Captioner,
    images: Sequence[Image.Image | Path | bytes],
    prefix: str = "",
    max_chars: int = 2000,
) -> list[str]:
    """One caption per image (an image, a file, or an encoded file's bytes), in order:
    greedy decoding (the same image always gets the same caption), at most
    CAPTION_MAX_NEW_TOKENS tokens, trimmed, after `prefix` (as cog-sdxl's caption_prefix:
    "a photo of TOK," gives "a photo of TOK, a man in a red shirt"), cut at a word to at
    most `max_chars` characters. A caption the model leaves empty stays empty (no prefix
    alone). Files are read a batch at a time and kept only downscaled; one that cannot be
    read raises EngineError."""
    import torch

    captions: list[str] = []
    for start in range(0, len(images), CAPTION_BATCH_IMAGES):
        batch = [
            _prepared(image, captioner.image_side)
            for image in images[start : start + CAPTION_BATCH_IMAGES]
        ]
        with torch.inference_mode():
            inputs = captioner.processor(images=batch, return_tensors="pt")
            tokens = captioner.model.generate(
                **inputs, max_new_tokens=CAPTION_MAX_NEW_TOKENS, do_sample=False, num_beams=1
            )
        texts: list[str] = captioner.processor.batch_decode(tokens, skip_special_tokens=True)
        captions += [_with_prefix(" ".join(text.split()), prefix, max_chars) for text in texts]
    return captions


def build_tiny_captioner(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight miniature BLIP captioner (BlipForConditionalGeneration,
    BlipProcessor with a BERT WordPiece tokenizer of a few dozen words) to `folder` in
    transformers' own format, unless it is there already; returns `folder`. It appears
    through one rename, so a folder that exists is complete. Its captions are random
    words: it is there so the captioning path runs with no weights to download."""
    return build_folder_once(
        folder,
        lambda staging: _save_tiny_captioner(staging, seed),
        lambda built: (built / "config.json").is_file(),
    )


def _save_tiny_captioner(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = {token: index for index, token in enumerate((*_TINY_SPECIAL_TOKENS, *_TINY_WORDS))}
    # [DEC] is a special token, so decoding leaves it out as BLIP's own tokenizer does.
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=128)
    image_processor = BlipImageProcessor(size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE})
    # BLIP starts decoding at [DEC] and stops at [SEP], as the real checkpoints do.
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "projection_dim": 32,
            "bos_token_id": vocab["[DEC]"],
            "eos_token_id": vocab["[SEP]"],
            "sep_token_id": vocab["[SEP]"],
            "pad_token_id": vocab["[PAD]"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIDE,
            "patch_size": 16,
            "projection_dim": 32,
            # Real BLIP's 1e-10 would make every image's embedding the same, and so its
            # caption: with weights this large, different images read differently.
            "initializer_range": 0.02,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor, tokenizer).save_pretrained(out)


def _input_side(image_processor: Any) -> int:
    """The largest side the image processor resizes to (BLIP: 384; the tiny one: 64)."""
    size = getattr(image_processor, "size", None) or {}
    sides = [
        value
        for key in ("height", "width", "shortest_edge", "longest_edge")
        if isinstance(value := _size_value(size, key), int)
    ]
    return max(sides, default=384)


def _size_value(size: Any, key: str) -> object:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _prepared(image: Image.Image | Path | bytes, side: int) -> Image.Image:
    """The image as it trains (upright by its EXIF, transparency on white:
    dataset.training_rgb), its shorter side at most `side`: the processor resizes to about
    that anyway, and a 12-megapixel photo would cost it far more."""
    if isinstance(image, Image.Image):
        return _downscaled(training_rgb(ImageOps.exif_transpose(image)), side)
    name = image.name if isinstance(image, Path) else "the image"
    try:
        with Image.open(image if isinstance(image, Path) else io.BytesIO(image)) as opened:
            # A JPEG decodes straight at a fraction of its size, at least `side`.
            opened.draft("RGB", (side, side))
            return _downscaled(training_rgb(ImageOps.exif_transpose(opened)), side)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise EngineError(f"{name} could not be read for captioning ({error})") from error


def _downscaled(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _with_prefix(caption: str, prefix: str, max_chars: int) -> str:
    prefix = " ".join(prefix.split())
    text = f"{prefix} {caption}" if prefix and caption else caption
    if len(text) > max_chars:
        head = text[: max_chars + 1]
        text = head.rsplit(" ", 1)[0] if " " in head else head[:max_chars]
    return text
