from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_merge import UNetLoraMerger, is_unet_only
from sdxl_engine.pipelines import Pipelines
from sdxl_engine.source import ModelSource


def _unet_output(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """One UNet forward on fixed random inputs shaped for the tiny Base."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    text = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(1, pooled_dim, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_merged_lora_computes_what_stock_diffusers_computes(
    tiny_source: ModelSource, trained_lora: Path
) -> None:
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_source.base)
    plain = _unet_output(stock.unet)
    stock.load_lora_weights(str(trained_lora))
    with_peft_layers = _unet_output(stock.unet)
    stock.unload_lora_weights()

    merger = UNetLoraMerger(stock.unet)
    merger.merge(trained_lora)
    merged = _unet_output(stock.unet)
    merger.restore()

    relative_error = (merged - with_peft_layers).norm() / with_peft_layers.norm()
    assert relative_error < 1e-5
    assert (with_peft_layers - plain).abs().max() > 1e-3  # the LoRA does change the output
    assert torch.equal(_unet_output(stock.unet), plain)


def test_restore_gives_back_the_exact_weights_and_scale_applies(
    pipelines: Pipelines, trained_lora: Path
) -> None:
    unet = pipelines.base.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merger = UNetLoraMerger(unet)
    merger.merge(trained_lora, scale=0.5)
    half = {k: v.clone() for k, v in unet.state_dict().items()}
    merger.merge(trained_lora, scale=1.0)  # a switch: restores first, then merges
    full = unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], full[k])]
    assert changed and all(".to_" in k for k in changed)
    for key in changed:
        assert torch.allclose(half[key] - before[key], (full[key] - before[key]) / 2, atol=1e-6)
    merger.restore()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_a_lora_for_another_model_is_refused(pipelines: Pipelines, trained_lora: Path, tmp_path):
    tensors = load_file(trained_lora)
    renamed = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in tensors.items()}
    foreign = tmp_path / "foreign.safetensors"
    save_file(renamed, str(foreign))
    merger = UNetLoraMerger(pipelines.base.unet)
    with pytest.raises(EngineError, match="does not have"):
        merger.merge(foreign)


def test_only_unet_factor_files_take_the_merge_path(trained_lora: Path, tmp_path) -> None:
    assert is_unet_only(trained_lora)
    with_text_encoder = tmp_path / "te.safetensors"
    save_file(
        {**load_file(trained_lora), "text_encoder.x.lora.down.weight": torch.zeros(1, 1)},
        str(with_text_encoder),
    )
    assert not is_unet_only(with_text_encoder)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert not is_unet_only(garbage)
