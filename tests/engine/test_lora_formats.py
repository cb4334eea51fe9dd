from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file, save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import generate
from sdxl_engine.lora_files import read_lora_metadata
from sdxl_engine.lora_formats import (
    ADAPTER_METADATA_KEY,
    canonical_lora_file,
    is_canonical,
    kohya_lora_bytes,
    to_canonical,
    to_kohya,
)
from sdxl_engine.pipelines import Pipelines
from tests.helpers import images_close
from tests.lora_variants import (
    write_diffusers_lora_with_alpha_twice_rank,
    write_kohya_lora_with_alpha_twice_rank,
)

from .test_generation import SMALL

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _has_unet_pairs_only(path: Path) -> bool:
    """Whether every key of the file is a canonical UNet factor (`unet.<module>.lora...`)."""
    return all(key.startswith("unet.") for key in load_file(path))


def _base_image(pipelines: Pipelines, lora: Path | None) -> np.ndarray:
    """The Base pipeline's output for a fixed seed, with `lora` loaded by stock diffusers."""
    base = pipelines.base
    if lora is not None:
        base.load_lora_weights(str(lora), adapter_name="under_test")
    try:
        return base(
            prompt="a red square",
            height=64,
            width=64,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(3),
            output_type="np",
        ).images
    finally:
        if lora is not None:
            base.unload_lora_weights()


@pytest.fixture(scope="module")
def kohya_file(trained_lora: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kohya") / "lora_kohya.safetensors"
    path.write_bytes(kohya_lora_bytes(trained_lora, base_model="fallback-name"))
    return path


def test_trained_lora_is_already_canonical(trained_lora: Path) -> None:
    assert is_canonical(trained_lora)


def test_kohya_export_has_kohya_keys_and_the_metadata_a1111_reads(
    trained_lora: Path, kohya_file: Path
) -> None:
    tensors = load_file(kohya_file)
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert all(key.endswith(KOHYA_SUFFIXES) for key in tensors)
    assert sum(key.endswith(".alpha") for key in tensors) == len(tensors) // 3
    assert not is_canonical(kohya_file)
    # One module, spelt out: dots inside the module path become underscores.
    assert (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight"
        in tensors
    )
    metadata = read_lora_metadata(kohya_file)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    # The trained file names its base model; that wins over the fallback.
    assert metadata["ss_sd_model_name"].endswith("base")
    assert metadata["sdxl_service.rank"] == "4"
    assert ADAPTER_METADATA_KEY not in metadata


def test_kohya_export_loaded_by_stock_diffusers_gives_the_same_image(
    pipelines: Pipelines, trained_lora: Path, kohya_file: Path
) -> None:
    without = _base_image(pipelines, None)
    original = _base_image(pipelines, trained_lora)
    kohya = _base_image(pipelines, kohya_file)

    assert np.abs(original - without).max() > 1e-3  # the LoRA does change the image
    np.testing.assert_allclose(kohya, original, rtol=0, atol=1e-5)


def test_kohya_converts_back_to_the_same_canonical_tensors(trained_lora: Path) -> None:
    canonical = load_file(trained_lora)
    back = to_canonical(load(kohya_lora_bytes(trained_lora, "x")), {})

    assert back.keys() == canonical.keys()
    assert all(torch.equal(back[key], canonical[key]) for key in canonical)


def _sgm_name(key: str, layers_per_block: int) -> str:
    """A diffusers-style kohya key with sd-scripts' SDXL block numbers instead."""
    per_block = layers_per_block + 1

    def down(match: re.Match) -> str:
        block, layer = int(match[1]), int(match[2])
        return f"lora_unet_input_blocks_{1 + block * per_block + layer}_1_"

    def up(match: re.Match) -> str:
        block, layer = int(match[1]), int(match[2])
        return f"lora_unet_output_blocks_{block * per_block + layer}_1_"

    key = re.sub(r"^lora_unet_down_blocks_(\d+)_attentions_(\d+)_", down, key)
    key = re.sub(r"^lora_unet_up_blocks_(\d+)_attentions_(\d+)_", up, key)
    return key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")


def test_kohya_with_sd_scripts_block_numbers_converts_for_the_unet_layout(
    pipelines: Pipelines, trained_lora: Path, tmp_path: Path
) -> None:
    layers_per_block = pipelines.base.unet.config.layers_per_block
    kohya = to_kohya(load_file(trained_lora))
    sgm = {_sgm_name(key, layers_per_block): tensor for key, tensor in kohya.items()}
    assert any("input_blocks" in key for key in sgm)
    sgm_file = tmp_path / "sgm.safetensors"
    save_file(sgm, str(sgm_file))
    canonical_file = tmp_path / "canonical.safetensors"

    canonical_lora_file(sgm_file, canonical_file, layers_per_block=layers_per_block)

    original = load_file(trained_lora)
    converted = load_file(canonical_file)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[key], original[key]) for key in original)
    assert is_canonical(canonical_file)
    # And stock diffusers reads the sd-scripts names the same way.
    np.testing.assert_allclose(
        _base_image(pipelines, sgm_file), _base_image(pipelines, trained_lora), atol=1e-5
    )


def test_kohya_with_alpha_twice_rank_converts_to_the_same_adapter(
    trained_lora: Path, tmp_path: Path
) -> None:
    kohya = write_kohya_lora_with_alpha_twice_rank(trained_lora, tmp_path / "kohya.safetensors")
    converted = tmp_path / "converted.safetensors"

    canonical_lora_file(kohya, converted)

    original, back = load_file(trained_lora), load_file(converted)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)
    assert is_canonical(converted)


def _generated_with_stock_lora(pipelines: Pipelines, lora: Path, **request) -> list[Image.Image]:
    """generate's images with `lora` loaded into the Base beforehand by stock diffusers'
    `load_lora_weights` (generate itself is given no LoRA): the reference for ours."""
    pipelines.base.load_lora_weights(str(lora))
    try:
        return generate(pipelines, **request)
    finally:
        pipelines.base.unload_lora_weights()


@pytest.mark.parametrize("stored_as", ["diffusers", "kohya", "kohya converted"])
def test_lora_with_alpha_twice_rank_generates_what_stock_diffusers_does(
    pipelines: Pipelines, trained_lora: Path, tmp_path: Path, stored_as: str
) -> None:
    """The trained adapter rewritten with alpha = 2 x rank and halved up-weights, as a
    session may hold it: diffusers' file found on disk (merged in place), kohya's found on
    disk (loaded through PEFT), kohya's stored by upload (converted, then merged)."""
    if stored_as == "diffusers":
        source = write_diffusers_lora_with_alpha_twice_rank(trained_lora, tmp_path)
    else:
        source = write_kohya_lora_with_alpha_twice_rank(trained_lora, tmp_path / "k.safetensors")
    lora = source
    if stored_as == "kohya converted":
        lora = tmp_path / "converted.safetensors"
        canonical_lora_file(source, lora)
    assert _has_unet_pairs_only(lora) == (stored_as != "kohya")
    request = {"prompt": "a red square", "seed": 9, **SMALL}

    stock = _generated_with_stock_lora(pipelines, source, **request)
    ours = generate(pipelines, lora_path=lora, **request)
    # Reading alpha as the rank would leave the halved up-weights: the adapter at half scale.
    alpha_ignored = generate(pipelines, lora_path=trained_lora, lora_scale=0.5, **request)

    assert images_close(ours, stock)
    assert not images_close(alpha_ignored, stock)


def test_kohya_alpha_is_folded_into_the_up_weights() -> None:
    down, up = torch.randn(4, 16), torch.randn(16, 4)
    kohya = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    canonical = to_canonical(kohya, {})
    assert torch.equal(canonical["unet.mid_block.attentions.0.proj_in.lora.down.weight"], down)
    assert torch.allclose(canonical["unet.mid_block.attentions.0.proj_in.lora.up.weight"], up / 2)


def test_text_encoder_pairs_take_diffusers_text_encoder_form() -> None:
    kohya = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.ones(2, 8),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.ones(8, 2),
    }
    # As the installed transformers names the modules: CLIPTextModel's without `text_model.`.
    assert sorted(to_canonical(kohya, {})) == [
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.down.weight",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer.up.weight",
    ]


def test_peft_file_with_its_adapter_config_converts_with_the_same_effect(
    pipelines: Pipelines, trained_lora: Path, tmp_path: Path
) -> None:
    """A PEFT-keyed file whose config says alpha = 2 x rank, as other trainers write."""
    canonical = load_file(trained_lora)
    peft = {
        key.replace(".lora.down.weight", ".lora_A.weight").replace(
            ".lora.up.weight", ".lora_B.weight"
        ): (tensor / 2 if key.endswith(".up.weight") else tensor)
        for key, tensor in canonical.items()
    }
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
    }
    peft_file = tmp_path / "peft.safetensors"
    save_file(peft, str(peft_file), metadata={ADAPTER_METADATA_KEY: json.dumps(config)})
    assert not is_canonical(peft_file)
    converted_file = tmp_path / "converted.safetensors"

    canonical_lora_file(peft_file, converted_file)

    converted = load_file(converted_file)
    assert converted.keys() == canonical.keys()
    assert all(torch.allclose(converted[key], canonical[key]) for key in canonical)
    np.testing.assert_allclose(
        _base_image(pipelines, peft_file), _base_image(pipelines, converted_file), atol=1e-5
    )


def test_an_unprefixed_config_scales_a_bare_peft_adapter() -> None:
    """As PEFT's get_peft_model_state_dict(unet) and its LoraConfig write one model's adapter:
    no component before the keys or the config's fields."""
    down, up = torch.randn(4, 16), torch.randn(16, 4)
    bare = {
        "mid_block.attentions.0.proj_in.lora_A.weight": down,
        "mid_block.attentions.0.proj_in.lora_B.weight": up,
    }
    config = json.dumps({"r": 4, "lora_alpha": 8})

    canonical = to_canonical(bare, {ADAPTER_METADATA_KEY: config})

    assert canonical.keys() == {
        "unet.mid_block.attentions.0.proj_in.lora.down.weight",
        "unet.mid_block.attentions.0.proj_in.lora.up.weight",
    }
    assert torch.equal(canonical["unet.mid_block.attentions.0.proj_in.lora.up.weight"], up * 2)


@pytest.mark.parametrize(
    "config",
    [
        {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": 8}},
        {"unet.r": 4, "unet.lora_alpha": 4, "unet.rank_pattern": {"to_q": 2}},
        {"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": True},
    ],
    ids=["alpha-pattern", "rank-pattern", "dora"],
)
def test_per_module_alphas_or_ranks_and_dora_in_the_config_are_refused(
    trained_lora: Path, tmp_path: Path, config: dict
) -> None:
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    metadata = {ADAPTER_METADATA_KEY: json.dumps(config)}
    save_file(load_file(trained_lora), str(source), metadata=metadata)
    with pytest.raises(EngineError, match="per-module alphas or ranks|DoRA"):
        canonical_lora_file(source, target)
    assert not target.exists()


@pytest.mark.parametrize(
    "tensors",
    [
        {"model.layer.weight": torch.zeros(2, 2)},
        {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8)},
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.zeros(1, 8),
        },
    ],
    ids=["not-a-lora", "down-without-up", "dora"],
)
def test_what_cannot_convert_exactly_is_refused(tensors: dict, tmp_path: Path) -> None:
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(source))
    with pytest.raises(EngineError):
        canonical_lora_file(source, target)
    assert not target.exists()


def test_kohya_export_carries_both_text_encoders_and_gives_the_same_image(
    pipelines: Pipelines, text_encoder_lora: Path, tmp_path: Path
) -> None:
    kohya_file = tmp_path / "kohya.safetensors"
    kohya_file.write_bytes(kohya_lora_bytes(text_encoder_lora, base_model="x"))

    prefixes = {key.split("_")[1] for key in load_file(kohya_file)}
    assert prefixes == {"unet", "te1", "te2"}
    assert is_canonical(text_encoder_lora) and not _has_unet_pairs_only(text_encoder_lora)
    original = _base_image(pipelines, text_encoder_lora)
    unet_part_only = tmp_path / "unet-only.safetensors"
    save_file(
        {k: v for k, v in load_file(text_encoder_lora).items() if k.startswith("unet.")},
        str(unet_part_only),
    )
    # The text encoders' part does change the image; kohya's form changes it alike.
    assert np.abs(original - _base_image(pipelines, unet_part_only)).max() > 1e-3
    np.testing.assert_allclose(_base_image(pipelines, kohya_file), original, rtol=0, atol=1e-5)
    back = to_canonical(load(kohya_file.read_bytes()), {})
    assert back.keys() == load_file(text_encoder_lora).keys()
