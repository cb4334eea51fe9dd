from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load, load_file, save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.generation import generate
from sdxl_engine.generation.merge import AppliedLora
from sdxl_engine.generation.pipelines import Pipelines
from sdxl_engine.lora_files import check_lora, read_lora_metadata
from sdxl_engine.lora_formats import (
    ADAPTER_METADATA_KEY,
    canonical_lora_file,
    is_canonical,
    kohya_lora_bytes,
    to_canonical,
    to_kohya,
)
from sdxl_engine.lora_keys import split_lora_key
from tests import community_loras
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
    assert metadata["ss_sd_model_name"] == "tiny"  # the preset's name, not its folder
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
    ours = generate(pipelines, loras=[AppliedLora(lora)], **request)
    # Reading alpha as the rank would leave the halved up-weights: the adapter at half scale.
    alpha_ignored = generate(pipelines, loras=[AppliedLora(trained_lora, 0.5)], **request)

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


# --- Community LoRA and LoCon files (tests/community_loras.py) -----------------------------


@pytest.fixture(scope="module")
def stock_base(tiny_model_dirs) -> StableDiffusionXLPipeline:
    """The tiny Base as stock diffusers loads it: the reference for every form."""
    return StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dirs[0]))


def _component_outputs(pipe: StableDiffusionXLPipeline, lora: Path | None) -> list[torch.Tensor]:
    """Both text encoders' penultimate hidden states and pooled output, and the UNet's
    prediction on them, for fixed inputs, with `lora` loaded by stock diffusers."""
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    try:
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        ids = torch.randint(0, 500, (1, 77), generator=generator)
        with torch.no_grad():
            first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
            states = torch.cat([first, second.hidden_states[-2]], dim=-1)
            conditions = {
                "text_embeds": second.text_embeds,
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
            }
            unet = pipe.unet(latents, 10, states, added_cond_kwargs=conditions).sample
        return [first, second.hidden_states[-2], second.text_embeds, unet]
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


WRITERS = {
    "sd-scripts LoCon": community_loras.write_kohya_locon,
    "LyCORIS LoCon": community_loras.write_lycoris_locon,
    "PEFT": community_loras.write_peft_lora,
    "diffusers": community_loras.write_diffusers_lora,
}


@pytest.mark.parametrize("form", list(WRITERS))
def test_community_file_converted_computes_what_stock_diffusers_makes_of_the_original(
    stock_base, tiny_model_dirs, tmp_path: Path, form: str
) -> None:
    """The canonical file, loaded by stock diffusers, changes both text encoders and the
    UNet exactly as stock diffusers loading the original file does."""
    original = WRITERS[form](tmp_path / "original.safetensors", tiny_model_dirs)
    converted = tmp_path / "canonical.safetensors"
    layers = stock_base.unet.config.layers_per_block
    canonical_lora_file(original, converted, layers_per_block=layers)
    assert is_canonical(converted)
    check_lora(converted, community_loras.model_shapes(tiny_model_dirs[0]))

    without = _component_outputs(stock_base, None)
    stock = _component_outputs(stock_base, original)
    ours = _component_outputs(stock_base, converted)

    for name, plain, expected, actual in zip(
        ["text_encoder", "text_encoder_2", "pooled", "unet"], without, stock, ours, strict=True
    ):
        assert (expected - plain).abs().max() > 1e-2, f"the LoRA does not change {name}"
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=name)


def test_kohya_locon_keeps_every_pair_and_spells_each_module_as_diffusers(
    tiny_model_dirs, tmp_path: Path
) -> None:
    path = community_loras.write_kohya_locon(tmp_path / "k.safetensors", tiny_model_dirs)
    tensors = load_file(path)
    assert any(key.startswith("lora_unet_input_blocks_") for key in tensors)
    assert any("_in_layers_2." in key for key in tensors)
    assert any(key.startswith("lora_te1_text_model_encoder_") for key in tensors)

    canonical = to_canonical(tensors, read_lora_metadata(path), layers_per_block=1)

    assert len(canonical) == 2 * sum(key.endswith(".alpha") for key in tensors)
    shapes = community_loras.model_shapes(tiny_model_dirs[0])
    modules = {}
    for key in canonical:
        lora_key = split_lora_key(key)
        modules.setdefault(lora_key.component, set()).add(lora_key.module)
    unet = shapes["unet"]
    assert modules["unet"] == set(community_loras.sd_scripts_unet_modules(unet))
    for component in ("text_encoder", "text_encoder_2"):
        expected = community_loras.sd_scripts_text_encoder_modules(shapes[component])
        assert modules[component] == set(expected)
    # A 3x3 conv's pair: down (rank, in, 3, 3), up (out, rank, 1, 1), alpha folded in.
    down = canonical["unet.down_blocks.0.resnets.0.conv1.lora.down.weight"]
    up = canonical["unet.down_blocks.0.resnets.0.conv1.lora.up.weight"]
    assert down.shape == (2, 32, 3, 3) and up.shape == (32, 2, 1, 1)
    original_up = tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"]
    torch.testing.assert_close(up, original_up * (1.0 / 2))  # conv_alpha 1 / conv rank 2


@pytest.mark.parametrize("form", list(WRITERS))
def test_canonical_community_file_goes_to_kohya_and_back_unchanged(
    tiny_model_dirs, tmp_path: Path, form: str
) -> None:
    original = WRITERS[form](tmp_path / "original.safetensors", tiny_model_dirs)
    canonical_file = tmp_path / "canonical.safetensors"
    canonical_lora_file(original, canonical_file, layers_per_block=1)
    canonical = load_file(canonical_file)

    kohya = load(kohya_lora_bytes(canonical_file, base_model="x"))
    # Text encoders' layers as sd-scripts, AUTOMATIC1111 and ComfyUI spell them.
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0_") for key in kohya)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_0_") for key in kohya)
    back = to_canonical(kohya, {})

    assert back.keys() == canonical.keys()
    assert all(torch.equal(back[key], canonical[key]) for key in canonical)


@pytest.mark.parametrize(
    ("writer", "kind"),
    [(community_loras.write_loha, "LoHa"), (community_loras.write_lokr, "LoKr")],
)
def test_loha_and_lokr_are_refused_by_name(tiny_model_dirs, tmp_path: Path, writer, kind) -> None:
    source, target = writer(tmp_path / "in.safetensors", tiny_model_dirs), tmp_path / "out"
    with pytest.raises(EngineError, match=f"^{kind} is not supported .*upload a plain LoRA or"):
        canonical_lora_file(source, target)
    assert not target.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lora_unet_x.dora_scale": torch.ones(1, 4)}, "DoRA is not supported"),
        ({"lora_unet_x.lora_mid.weight": torch.ones(2, 2, 3, 3)}, "lora_mid"),
        ({"lora_unet_x.on_input": torch.ones(4)}, "(IA)3 is not supported"),
        ({"lora_unet_x.weight": torch.ones(4)}, "(IA)3 is not supported"),
        ({"lora_unet_x.a1.weight": torch.ones(2, 4)}, "GLoRA is not supported"),
        ({"lora_unet_x.oft_blocks": torch.ones(2, 2, 2)}, "OFT/BOFT is not supported"),
        ({"lora_unet_x.diff": torch.ones(4, 4)}, "full weight difference"),
        ({"lora_unet_x.w_norm": torch.ones(4)}, "Norm-layer training is not supported"),
        ({"lora_unet_x.scalar": torch.ones(())}, "use_scalar is not supported"),
        ({"lora_unet_x.lora_up.bias": torch.ones(4)}, "LoRA bias is not supported"),
        ({"lora_unet_x.hada_w1_a": torch.ones(4, 2)}, "LoHa is not supported"),
        ({"lora_unet_x.lokr_w1": torch.ones(2, 2)}, "LoKr is not supported"),
        ({"lora_unet_x.something": torch.ones(2)}, "'lora_unet_x.something' is no LoRA/LoCon"),
    ],
)
def test_other_adapter_kinds_in_a_kohya_file_are_refused_by_name(extra: dict, message) -> None:
    pair = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
    }
    with pytest.raises(EngineError, match=re.escape(message)):
        to_canonical({**pair, **extra}, {})


@pytest.mark.parametrize(
    "key",
    [
        "unet.mid_block.attentions.0.proj_in.lora_magnitude_vector",
        "unet.mid_block.attentions.0.proj_in.lora_A.bias",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.hada_w1_a",
    ],
)
def test_other_adapter_kinds_in_a_peft_file_are_refused_by_name(key: str) -> None:
    pair = {
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2),
    }
    with pytest.raises(EngineError, match="is not supported .*upload a plain LoRA or LoCon"):
        to_canonical({**pair, key: torch.zeros(8)}, {})


def test_one_module_spelt_twice_is_an_error_not_a_lost_pair() -> None:
    """sd-scripts' and diffusers' block names for the same module: diffusers' converter
    drops one layout silently; ours refuses the file."""
    tensors = {}
    for name in ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"):
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(EngineError, match="name only 2 distinct module weights"):
        to_canonical(tensors, {})


def test_a_kohya_alpha_of_zero_means_no_scaling_as_in_sd_scripts() -> None:
    down, up = torch.randn(4, 16), torch.randn(16, 4)
    kohya = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": down,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": up,
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(0.0),
    }
    assert torch.equal(
        to_canonical(kohya, {})["unet.mid_block.attentions.0.proj_in.lora.up.weight"], up
    )


def test_full_size_sdxl_kohya_locon_fits_sdxl_and_a_wrong_shape_is_named(tmp_path: Path) -> None:
    """A LoCon laid out as sd-scripts writes one for SDXL Base (its SGM block names), rank
    1 on one module of every kind and place, checked against the full-size model's
    meta-device shapes after conversion."""
    folder = community_loras.packaged_model_folder("sdxl", tmp_path / "sdxl")
    shapes = community_loras.model_shapes(folder)
    modules = [
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.1.time_emb_proj",
        "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.1.attentions.1.proj_in",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "mid_block.resnets.0.conv2",
        "mid_block.attentions.0.transformer_blocks.5.ff.net.2",
        "mid_block.resnets.1.time_emb_proj",
        "up_blocks.0.resnets.2.conv_shortcut",
        "up_blocks.0.attentions.2.proj_out",
        "up_blocks.0.upsamplers.0.conv",
        "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0",
        "up_blocks.1.upsamplers.0.conv",
        "up_blocks.2.resnets.2.conv2",
    ]
    tensors = community_loras.kohya_locon_tensors(
        shapes, 2, rank=1, conv_rank=1, unet_modules=modules, text_encoders=True
    )
    # sd-scripts' names, checked against library/sdxl_model_util.py's conversion map.
    names = {key.split(".")[0] for key in tensors}
    for expected in (
        "lora_unet_input_blocks_0_0",
        "lora_unet_out_2",
        "lora_unet_time_embed_0",
        "lora_unet_label_emb_0_2",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_2_0_emb_layers_1",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_5_1_proj_in",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_middle_block_0_out_layers_3",
        "lora_unet_middle_block_1_transformer_blocks_5_ff_net_2",
        "lora_unet_output_blocks_2_0_skip_connection",
        "lora_unet_output_blocks_2_1_proj_out",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_output_blocks_8_0_out_layers_3",
        "lora_te1_text_model_encoder_layers_11_mlp_fc2",
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    ):
        assert expected in names
    canonical = to_canonical(tensors, {}, layers_per_block=2)
    path = tmp_path / "sdxl.safetensors"
    save_file(canonical, str(path))
    assert check_lora(path, shapes).rank == 1
    assert {split_lora_key(k).module for k in canonical if k.startswith("unet.")} == set(modules)

    key = "unet.down_blocks.1.resnets.0.conv_shortcut.lora.down.weight"
    save_file({**canonical, key: torch.zeros(1, 640, 1, 1)}, str(path))
    with pytest.raises(EngineError, match="conv_shortcut adds a 640 x 640 x 1 x 1 weight, but"):
        check_lora(path, shapes)
    tiny = community_loras.packaged_model_folder("tiny", tmp_path / "tiny")
    with pytest.raises(EngineError, match="fc1 adds a 3072 x 768 weight, but this model's Linear"):
        check_lora(path, community_loras.model_shapes(tiny))  # the same names, narrower


def test_the_kohya_form_of_a_file_that_holds_a_server_path_names_only_the_model(
    tmp_path: Path,
) -> None:
    """LoRAs trained before model names were written hold the Base's folder: the kohya
    form sends its name instead."""
    from tests.helpers import lora_bytes

    tensors = load(lora_bytes())
    path = tmp_path / "old.safetensors"
    save_file(
        tensors, str(path), metadata={"sdxl_service.base_model": "/srv/sdxl/media/models/tiny/base"}
    )

    metadata = _metadata_of(kohya_lora_bytes(path, base_model="/srv/sdxl/models/fallback"))
    assert metadata["sdxl_service.base_model"] == metadata["ss_sd_model_name"] == "base"
    without = tmp_path / "uploaded.safetensors"
    save_file(tensors, str(without))
    kohya = kohya_lora_bytes(without, base_model="/srv/sdxl/models/fallback")
    assert _metadata_of(kohya)["ss_sd_model_name"] == "fallback"


def _metadata_of(data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes."""
    length = int.from_bytes(data[:8], "little")
    metadata: dict[str, str] = json.loads(data[8 : 8 + length]).get("__metadata__", {})
    return metadata
