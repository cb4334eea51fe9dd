from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.merge import AppliedLora, LoraMerger
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.lora_keys import ADAPTER_METADATA_KEY, COMPONENTS, TEXT_ENCODERS
from sdxl_engine.source import ModelSource
from tests.lora_variants import write_diffusers_lora_with_alpha_twice_rank


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


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _stock_output(pipeline: StableDiffusionXLPipeline, lora: Path) -> torch.Tensor:
    """The UNet's output with `lora` loaded by stock diffusers (PEFT layers), unloaded after."""
    pipeline.load_lora_weights(str(lora))
    try:
        return _unet_output(pipeline.unet)
    finally:
        pipeline.unload_lora_weights()


def _merged_output(unet: torch.nn.Module, lora: Path) -> torch.Tensor:
    """The UNet's output with `lora` merged into its weights in place, restored after."""
    merger = LoraMerger({"unet": unet})
    merger.merge([AppliedLora(lora)])
    try:
        return _unet_output(unet)
    finally:
        merger.restore()


@pytest.fixture(scope="module")
def stock_pipeline(tiny_source: ModelSource) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_source.base)


def test_merged_lora_computes_what_stock_diffusers_computes(
    stock_pipeline: StableDiffusionXLPipeline, trained_lora: Path
) -> None:
    plain = _unet_output(stock_pipeline.unet)
    with_peft_layers = _stock_output(stock_pipeline, trained_lora)
    merged = _merged_output(stock_pipeline.unet, trained_lora)

    assert _relative_error(merged, with_peft_layers) < 1e-5
    assert (with_peft_layers - plain).abs().max() > 1e-3  # the LoRA does change the output
    assert torch.equal(_unet_output(stock_pipeline.unet), plain)


def test_alpha_in_diffusers_adapter_metadata_is_merged_at_stock_strength(
    stock_pipeline: StableDiffusionXLPipeline, trained_lora: Path, tmp_path: Path
) -> None:
    lora = write_diffusers_lora_with_alpha_twice_rank(trained_lora, tmp_path)
    config = json.loads(read_lora_metadata(lora)[ADAPTER_METADATA_KEY])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (4, 8)
    # The same factors read as if alpha were the rank, as happens when the metadata is missed.
    alpha_missed = tmp_path / "alpha_missed.safetensors"
    save_file(load_file(lora), str(alpha_missed))

    stock = _stock_output(stock_pipeline, lora)
    merged = _merged_output(stock_pipeline.unet, lora)
    merged_without_alpha = _merged_output(stock_pipeline.unet, alpha_missed)

    assert _relative_error(merged, stock) < 1e-5
    assert _relative_error(merged_without_alpha, stock) > 0.1
    # Alpha 8 on halved up-weights is the trained adapter itself.
    assert _relative_error(stock, _stock_output(stock_pipeline, trained_lora)) < 1e-5


def test_restore_gives_back_the_exact_weights_and_scale_applies(
    pipelines: Pipelines, trained_lora: Path
) -> None:
    unet = pipelines.base.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    merger = LoraMerger({"unet": unet})
    merger.merge([AppliedLora(trained_lora, scale=0.5)])
    half = {k: v.clone() for k, v in unet.state_dict().items()}
    merger.merge([AppliedLora(trained_lora, scale=1.0)])  # a switch: restores, then merges
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
    merger = LoraMerger({"unet": pipelines.base.unet})
    with pytest.raises(EngineError, match="does not have"):
        merger.merge([AppliedLora(foreign)])


@pytest.fixture(scope="module")
def other_lora(trained_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second LoRA on the same modules, unlike the first: its factors shuffled."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        key: tensor.flatten()[torch.randperm(tensor.numel(), generator=generator)].view_as(tensor)
        for key, tensor in load_file(trained_lora).items()
    }
    path = tmp_path_factory.mktemp("other-lora") / "other.safetensors"
    save_file(tensors, str(path), metadata=read_lora_metadata(trained_lora))
    return path


def test_two_loras_merged_compute_what_stock_diffusers_computes_with_both_adapters(
    stock_pipeline: StableDiffusionXLPipeline, trained_lora: Path, other_lora: Path
) -> None:
    stock_pipeline.load_lora_weights(str(trained_lora), adapter_name="first")
    stock_pipeline.load_lora_weights(str(other_lora), adapter_name="second")
    try:
        stock_pipeline.set_adapters(["first", "second"], adapter_weights=[0.7, -0.4])
        both = _unet_output(stock_pipeline.unet)
        stock_pipeline.set_adapters(["first"], adapter_weights=[0.7])
        first_alone = _unet_output(stock_pipeline.unet)
    finally:
        stock_pipeline.unload_lora_weights()
    merger = LoraMerger({"unet": stock_pipeline.unet})
    merger.merge([AppliedLora(trained_lora, 0.7), AppliedLora(other_lora, -0.4)])
    try:
        merged = _unet_output(stock_pipeline.unet)
    finally:
        merger.restore()

    assert _relative_error(merged, both) < 1e-5
    assert _relative_error(first_alone, both) > 1e-3  # the second LoRA does count


def test_text_encoder_pairs_merge_into_the_text_encoders_and_restore_exactly(
    stock_pipeline: StableDiffusionXLPipeline, text_encoder_lora: Path
) -> None:
    prompt = "a red square"

    def encoded() -> torch.Tensor:
        with torch.no_grad():
            embeds, _, pooled, _ = stock_pipeline.encode_prompt(
                prompt, device="cpu", do_classifier_free_guidance=False
            )
        return torch.cat([embeds.flatten(), pooled.flatten()])

    plain = encoded()
    stock_pipeline.load_lora_weights(str(text_encoder_lora))
    try:
        stock = encoded()
    finally:
        stock_pipeline.unload_lora_weights()
    models = {name: getattr(stock_pipeline, name) for name in COMPONENTS}
    merger = LoraMerger(models)
    merger.merge([AppliedLora(text_encoder_lora)], components=TEXT_ENCODERS)
    merged = encoded()
    merger.restore()

    assert _relative_error(merged, stock) < 1e-5
    assert _relative_error(stock, plain) > 1e-3
    assert torch.equal(encoded(), plain)


def test_a_convolution_lora_merges_into_a_channels_last_kernel(tmp_path: Path) -> None:
    """A LoCon pair (down: rank x in x 3 x 3, up: out x rank x 1 x 1) changes the kernel by
    up @ down, written back in the weight's own memory format."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)).to(memory_format=torch.channels_last)
    weight = model[0].weight
    original = weight.detach().clone()
    down, up = torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1)
    lora = tmp_path / "locon.safetensors"
    save_file({"unet.0.lora.down.weight": down, "unet.0.lora.up.weight": up}, str(lora))
    merger = LoraMerger({"unet": model})

    merger.merge([AppliedLora(lora, 0.5)])

    expected = original + 0.5 * (up.flatten(1) @ down.flatten(1)).view_as(original)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(weight, expected, atol=1e-6)
    merger.restore()
    assert torch.equal(weight, original)
