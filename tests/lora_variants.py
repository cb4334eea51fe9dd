"""The same adapter as a trained LoRA, written the ways another trainer would with
alpha = 2 x rank (up-weights halved, so it computes the same): what a session may find on
disk or be sent, and what stock diffusers must read at the same strength as ours."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.lora_formats import to_kohya
from sdxl_engine.lora_keys import ADAPTER_METADATA_KEY


def write_diffusers_lora_with_alpha_twice_rank(trained_lora: Path, folder: Path) -> Path:
    """The trained adapter as diffusers' `save_lora_weights` writes one trained with
    lora_alpha = 2 x r: up-weights halved (so it computes the same), and the adapter config,
    prefixed with its component (`unet.lora_alpha`, `unet.r`), in the header."""
    config = json.loads(read_lora_metadata(trained_lora)[ADAPTER_METADATA_KEY])
    unet_config = {
        key.removeprefix("unet."): value for key, value in config.items() if key.startswith("unet.")
    }
    unet_config["lora_alpha"] = 2 * unet_config["r"]
    layers = {
        key.removeprefix("unet."): (tensor / 2 if key.endswith(".up.weight") else tensor)
        for key, tensor in load_file(trained_lora).items()
    }
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet_config,
        weight_name="alpha_twice_rank.safetensors",
    )
    return folder / "alpha_twice_rank.safetensors"


def write_kohya_lora_with_alpha_twice_rank(trained_lora: Path, path: Path) -> Path:
    """The trained adapter in kohya's form as sd-scripts writes one trained with
    network_alpha = 2 x network_dim: each alpha twice its rank, up-weights halved (so it
    computes the same)."""
    kohya = to_kohya(load_file(trained_lora))
    rewritten = {}
    for key, tensor in kohya.items():
        if key.endswith(".alpha"):
            rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
            assert tensor.item() == rank  # to_kohya writes alpha = rank
            tensor = tensor * 2
        elif key.endswith(".lora_up.weight"):
            tensor = tensor / 2
        rewritten[key] = tensor
    save_file(rewritten, str(path))
    return path
