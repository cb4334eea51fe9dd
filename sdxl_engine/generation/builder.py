"""Random-weight SDXL Base + Refiner pipelines, saved in diffusers format.

They let the service run without downloading SDXL: "tiny" is a miniature of SDXL's
structure for CPU tests; "sdxl" has the published shapes (random weights), so timings and
memory on a GPU are those of the real model. Both are loaded back with the same
`from_pretrained` calls as real weights. resolve_model_source builds them when the worker's
model choice (sdxl_engine.source) names one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_engine.errors import EngineError
from sdxl_engine.files import fsync_tree, publish_folder
from sdxl_engine.source import RANDOM_PRESETS, ModelConfig, ModelSource, plan_model_source

_Model = TypeVar("_Model", bound=torch.nn.Module)

PRESETS = ("tiny", "sdxl")
BUILD_STEPS = 5  # how many times build_random_pipelines calls on_step
CONFIG_DIR = Path(__file__).parent.parent / "configs"  # sdxl_engine/configs
TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def resolve_model_source(
    preset: str | None, base: str, refiner: str, cache_dir: Path
) -> ModelSource:
    """Pick the models from SDXL_MODEL_PRESET (`preset`; None or "" means auto).

    Auto uses the real SDXL weights when a CUDA device is present and the tiny random
    model otherwise. Random-weight presets are built once under `cache_dir/<preset>/`.
    Checks CUDA, so call it only in the process that will run the models (a process that
    initialises CUDA cannot fork safely).
    """
    cuda = torch.cuda.is_available()
    source = plan_model_source(preset, base, refiner, cache_dir, cuda=cuda)
    if source.preset in RANDOM_PRESETS:
        # Half precision halves the full-size build's disk and time; loading casts anyway.
        build_random_pipelines(
            RANDOM_PRESETS[source.preset],
            Path(cache_dir) / source.preset,
            dtype=torch.bfloat16 if cuda else None,
            device=source.device,
        )
    return source


def build_random_pipelines(
    preset: str,
    out_dir: Path,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """Write a random-weight Base pipeline to `out_dir/base` and a Refiner to `out_dir/refiner`.

    Returns the two folders. Folders that already exist are kept: each appears through a
    single rename, so an existing one is complete. `dtype` is the saved weights' precision
    (None: float32); `device` is where the weights are initialised (use "cuda" for the
    full-size preset: random init of 3.7 billion parameters is slow on a CPU).
    `on_step(what)` runs as each of the BUILD_STEPS build steps begins (for a progress bar);
    it is not called when both folders exist already.
    """
    if preset not in PRESETS:
        raise EngineError(
            f"unknown random-model preset {preset!r}; use one of {', '.join(PRESETS)}"
        )
    out_dir = Path(out_dir)
    base_dir, refiner_dir = out_dir / "base", out_dir / "refiner"
    if _is_pipeline_folder(base_dir) and _is_pipeline_folder(refiner_dir):
        return base_dir, refiner_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir))
    try:
        _save_random_pipelines(preset, staging, seed, dtype, device, on_step or (lambda _: None))
        fsync_tree(staging)
        # Both halves are rebuilt even if one exists (an interrupted earlier build): the
        # same seed gives the same weights, so the shared text encoder and VAE still match.
        for name, target in (("base", base_dir), ("refiner", refiner_dir)):
            publish_folder(staging / name, target, _is_pipeline_folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base_dir, refiner_dir


def load_component_config(preset: str, name: str) -> ModelConfig:
    """One component's config from `configs/<preset>/<name>.json`."""
    config: ModelConfig = json.loads(
        (CONFIG_DIR / preset / f"{name}.json").read_text(encoding="utf-8")
    )
    return config


def write_clip_tokenizer(folder: Path) -> None:
    """Write a byte-level CLIP BPE tokenizer that needs no download.

    Its vocabulary is the 256 byte symbols of GPT-2/CLIP byte-level BPE, their end-of-word
    forms and the two special tokens (514 ids, so every id fits the text encoders'
    embedding tables); with no merges every character becomes one token. Real CLIP merges
    would only change which ids a prompt maps to, not any shape.
    """
    symbols = _byte_level_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _byte_level_symbols() -> list[str]:
    """The printable stand-ins for the 256 byte values, in CLIP's vocabulary order.

    This is GPT-2's byte-to-unicode table, which CLIP's tokenizer uses too.
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    unprintable = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in sorted(printable)] + [
        chr(256 + index) for index in range(len(unprintable))
    ]


def _is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _save_random_pipelines(
    preset: str,
    staging: Path,
    seed: int,
    dtype: torch.dtype | None,
    device: str,
    step: Callable[[str], None],
) -> None:
    tokenizer_source = staging / "tokenizer-source"
    write_clip_tokenizer(tokenizer_source)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_source)
    scheduler = EulerDiscreteScheduler.from_config(load_component_config(preset, "scheduler"))

    torch_device = torch.device(device)
    rng_devices = [torch_device.index or 0] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch_device:
        torch.manual_seed(seed)
        step("VAE and text encoders")
        vae = _finish(AutoencoderKL.from_config(load_component_config(preset, "vae")), dtype)
        text_encoder_2 = _finish(
            CLIPTextModelWithProjection(
                CLIPTextConfig(**load_component_config(preset, "text_encoder_2"))
            ),
            dtype,
        )
        step("Base UNet")
        base = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_finish(
                CLIPTextModel(CLIPTextConfig(**load_component_config(preset, "text_encoder"))),
                dtype,
            ),
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=_finish(
                UNet2DConditionModel.from_config(load_component_config(preset, "unet_base")), dtype
            ),
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
        step("saving Base")
        base.save_pretrained(staging / "base", safe_serialization=True)
        # Free the Base-only parts before building the Refiner UNet: at full size that
        # halves peak memory.
        del base
        step("Refiner UNet")
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            # The Refiner has no first text encoder; diffusers annotates these parameters
            # without None, which its own Refiner checkpoints pass.
            text_encoder=None,  # type: ignore[arg-type]
            text_encoder_2=text_encoder_2,
            tokenizer=None,  # type: ignore[arg-type]
            tokenizer_2=tokenizer,
            unet=_finish(
                UNet2DConditionModel.from_config(load_component_config(preset, "unet_refiner")),
                dtype,
            ),
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
        step("saving Refiner")
        refiner.save_pretrained(staging / "refiner", safe_serialization=True)
        del refiner

    # Replace what transformers' save_pretrained wrote with the plain vocab.json +
    # merges.txt form, the one this module defines and documents.
    for tokenizer_folder in (
        staging / "base" / "tokenizer",
        staging / "base" / "tokenizer_2",
        staging / "refiner" / "tokenizer_2",
    ):
        shutil.rmtree(tokenizer_folder)
        write_clip_tokenizer(tokenizer_folder)
    shutil.rmtree(tokenizer_source)


def _finish(model: _Model, dtype: torch.dtype | None) -> _Model:
    model.requires_grad_(False)
    model.eval()
    return model.to(dtype) if dtype is not None else model
