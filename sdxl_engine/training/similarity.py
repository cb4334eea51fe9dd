"""How much a run's sample images look like its photos: the mean cosine similarity of
their embeddings by a CLIP vision model (EasyPhoto scores each checkpoint's samples against
the photos alike, with a face-recognition embedding: eval_jpg_with_faceid).

The embedder is a transformers CLIPVisionModelWithProjection with its CLIPImageProcessor,
from a hub id or a local folder (the service's SDXL_SIMILARITY_MODEL). The tiny preset
builds a tiny random one (build_random_embedder), so the whole path runs offline: its
similarities measure nothing, as its weights are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sdxl_engine.dataset import training_rgb
from sdxl_engine.errors import EngineError
from sdxl_engine.files import build_folder_once

# Under the model cache dir: the tiny preset's random embedder.
TINY_EMBEDDER_FOLDER = "tiny-clip-vision"
_TINY_SIDE = 32
_TINY_CONFIG = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=_TINY_SIDE,
    patch_size=8,
)
_WEIGHTS = "model.safetensors"


def similarity_model_source(configured: str, preset: str, cache_dir: Path) -> str | None:
    """The embedder a run scores its samples with: the `configured` one (hub id or local
    folder), else on the tiny preset a tiny random one (built once under `cache_dir`),
    else None (no similarity)."""
    if configured:
        return configured
    if preset == "tiny":
        return str(build_random_embedder(Path(cache_dir) / TINY_EMBEDDER_FOLDER))
    return None


def build_random_embedder(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP vision model and its processor saved in `folder` (kept when it
    exists: it appears through one rename, so an existing one is complete)."""
    return build_folder_once(
        folder, lambda staging: _save_random_embedder(staging, seed), _is_embedder_folder
    )


def _is_embedder_folder(folder: Path) -> bool:
    return (folder / _WEIGHTS).is_file()


def _save_random_embedder(out: Path, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(_TINY_CONFIG)
    model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessorPil(
        size={"shortest_edge": _TINY_SIDE},
        crop_size={"height": _TINY_SIDE, "width": _TINY_SIDE},
    ).save_pretrained(out)


class ImageEmbedder:
    """Unit-length CLIP image embeddings."""

    def __init__(self, source: str, device: str) -> None:
        try:
            # As a plain module: transformers' typing of to() and eval() trips mypy.
            model: torch.nn.Module = CLIPVisionModelWithProjection.from_pretrained(source)
            self._model = model.requires_grad_(False).eval().to(device)
            self._processor = CLIPImageProcessorPil.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise EngineError(
                f"the similarity model {source!r} could not be loaded ({error}); set "
                "SDXL_SIMILARITY_MODEL to a CLIP vision model with projection, or leave it empty"
            ) from error
        self._device = device

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(len(images), projection_dim), each row of unit length."""
        inputs = self._processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )
        with torch.no_grad():
            embeddings = self._model(
                pixel_values=inputs["pixel_values"].to(self._device)
            ).image_embeds
        return torch.nn.functional.normalize(embeddings.float(), dim=-1)

    def embed_files(self, paths: list[Path]) -> torch.Tensor:
        """embed() of image files, read as training reads them (upright, transparency white)."""
        images = []
        for path in paths:
            with Image.open(path) as opened:
                images.append(training_rgb(ImageOps.exif_transpose(opened)))
        return self.embed(images)


def mean_similarity(samples: torch.Tensor, photos: torch.Tensor) -> float:
    """The mean cosine similarity over every (sample, photo) pair of unit embeddings: in
    [-1, 1], higher when the samples look more like the photos."""
    return float((samples @ photos.T).mean().clamp(-1.0, 1.0))
