from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_keys import (
    ADAPTER_METADATA_KEY,
    ALPHA,
    DIFFUSERS,
    DOWN,
    KOHYA,
    PEFT,
    PEFT_MODEL,
    UP,
    LoraKey,
    community_module_path,
    factor_of,
    installed_module_path,
    is_sgm_module,
    is_target_projection,
    kohya_module_name,
    kohya_module_path,
    lora_scales,
    split_lora_key,
    unsupported_kind,
)

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TEXT_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"unet.{MODULE}.lora.down.weight", LoraKey(DIFFUSERS, "unet", MODULE, DOWN)),
        (f"unet.{MODULE}.lora.up.weight", LoraKey(DIFFUSERS, "unet", MODULE, UP)),
        (
            f"text_encoder.{TEXT_MODULE}.lora_linear_layer.down.weight",
            LoraKey(DIFFUSERS, "text_encoder", TEXT_MODULE, DOWN),
        ),
        (
            f"text_encoder_2.{TEXT_MODULE}.lora_linear_layer.up.weight",
            LoraKey(DIFFUSERS, "text_encoder_2", TEXT_MODULE, UP),
        ),
        (f"unet.{MODULE}.alpha", LoraKey(DIFFUSERS, "unet", MODULE, ALPHA)),
        (f"unet.{MODULE}.lora_A.weight", LoraKey(PEFT, "unet", MODULE, DOWN)),
        (
            f"text_encoder_2.{TEXT_MODULE}.lora_B.weight",
            LoraKey(PEFT, "text_encoder_2", TEXT_MODULE, UP),
        ),
        (f"{MODULE}.lora_A.weight", LoraKey(PEFT, None, MODULE, DOWN)),
        (f"base_model.model.{MODULE}.lora_B.weight", LoraKey(PEFT_MODEL, None, MODULE, UP)),
        (
            f"base_model.model.unet.{MODULE}.lora_A.weight",
            LoraKey(PEFT_MODEL, "unet", MODULE, DOWN),
        ),
        (
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
            LoraKey(KOHYA, "unet", "mid_block_attentions_0_proj_in", DOWN),
        ),
        (
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            LoraKey(KOHYA, "text_encoder", "text_model_encoder_layers_0_mlp_fc1", UP),
        ),
        (
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha",
            LoraKey(KOHYA, "text_encoder_2", "text_model_encoder_layers_0_mlp_fc1", ALPHA),
        ),
        (
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            LoraKey(KOHYA, "text_encoder", "text_model_encoder_layers_0_mlp_fc1", DOWN),
        ),
    ],
)
def test_keys_of_every_form_split_into_component_module_and_factor(
    key: str, expected: LoraKey
) -> None:
    assert split_lora_key(key) == expected
    assert factor_of(key) == expected.factor


@pytest.mark.parametrize(
    "key",
    [
        f"unet.{MODULE}.weight",  # a model weight, not a LoRA factor
        f"unet.{MODULE}.lora_magnitude_vector",  # DoRA
        "lora_unet_mid_block_attentions_0_proj_in.dora_scale",
        "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a",  # LoHa
        f"unet.{MODULE}.lora_B.bias",
        # diffusers' older attention-processor spelling: its own converters read that one
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
        # each component has its own diffusers spelling
        f"unet.{MODULE}.lora_linear_layer.down.weight",
        f"text_encoder.{TEXT_MODULE}.lora.down.weight",
        "base_model.model.x.lora.down.weight",  # PEFT's prefix on a diffusers spelling
        "unet.lora.down.weight",  # no module
    ],
)
def test_other_keys_are_no_lora_factors(key: str) -> None:
    assert split_lora_key(key) is None
    assert factor_of(key) is None


def test_keys_are_respelt_between_diffusers_and_peft() -> None:
    unet_down = split_lora_key(f"unet.{MODULE}.lora.down.weight")
    text_up = split_lora_key(f"text_encoder.{TEXT_MODULE}.lora_B.weight")

    assert unet_down.in_form(PEFT) == f"unet.{MODULE}.lora_A.weight"
    assert unet_down.in_form(DIFFUSERS) == f"unet.{MODULE}.lora.down.weight"
    assert text_up.in_form(DIFFUSERS) == f"text_encoder.{TEXT_MODULE}.lora_linear_layer.up.weight"
    assert split_lora_key(text_up.in_form(DIFFUSERS)).module_id == text_up.module_id


@pytest.mark.parametrize(
    ("key", "is_unet_factor"),
    [
        (f"unet.{MODULE}.lora.down.weight", True),
        (f"unet.{MODULE}.lora_B.weight", True),
        (f"unet.{MODULE}.alpha", False),
        (f"text_encoder.{TEXT_MODULE}.lora_linear_layer.down.weight", False),
        (f"{MODULE}.lora_A.weight", False),
        (f"base_model.model.unet.{MODULE}.lora_A.weight", False),
        ("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight", False),
    ],
)
def test_only_unet_pairs_under_unet_are_unet_factors(key: str, is_unet_factor: bool) -> None:
    assert split_lora_key(key).is_unet_factor is is_unet_factor


def test_target_projections_are_whole_trailing_names() -> None:
    assert is_target_projection(MODULE)
    assert is_target_projection("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert not is_target_projection("mid_block.attentions.0.proj_in")
    assert not is_target_projection("to_q")
    assert not is_target_projection("mid_block.attentions.0.transformer_blocks.0.attn1.xto_q")


# --- Each module's scale -------------------------------------------------------------------


def _metadata(config: dict) -> dict[str, str]:
    return {ADAPTER_METADATA_KEY: json.dumps(config), "format": "pt"}


def test_without_alphas_every_module_runs_at_scale_one() -> None:
    assert lora_scales({}).scale("unet", MODULE, rank=4) == 1.0
    assert lora_scales({"format": "pt"}).scale("text_encoder", TEXT_MODULE, rank=8) == 1.0


def test_diffusers_metadata_is_read_per_component() -> None:
    """As diffusers' save_lora_weights writes it: each field prefixed with its component."""
    scales = lora_scales(
        _metadata(
            {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
        )
    )

    assert scales.scale("unet", MODULE, rank=4) == 2.0
    assert scales.scale("text_encoder", TEXT_MODULE, rank=4) == 0.5
    assert scales.scale("text_encoder_2", TEXT_MODULE, rank=4) == 1.0  # no config of its own
    assert not scales.has_module_patterns


def test_an_unprefixed_peft_config_applies_to_the_whole_file() -> None:
    """As PEFT and diffusers' save_lora_adapter write one model's config."""
    scales = lora_scales(_metadata({"r": 8, "lora_alpha": 16, "target_modules": ["to_q"]}))

    assert scales.scale(None, MODULE, rank=8) == 2.0
    assert scales.scale("unet", MODULE, rank=8) == 2.0


def test_a_components_own_config_wins_over_an_unprefixed_one() -> None:
    scales = lora_scales(_metadata({"lora_alpha": 16, "unet.lora_alpha": 4}))

    assert scales.scale("unet", MODULE, rank=8) == 0.5
    assert scales.scale("text_encoder", TEXT_MODULE, rank=8) == 2.0


def test_kohya_alphas_give_each_module_its_scale_and_win_over_a_config() -> None:
    module = "mid_block_attentions_0_proj_in"
    scales = lora_scales(_metadata({"unet.lora_alpha": 1}), {("unet", module): 8.0})

    assert scales.scale("unet", module, rank=4) == 2.0
    assert scales.scale("unet", "mid_block_attentions_0_proj_out", rank=4) == 0.25


def test_rslora_divides_by_the_square_root_of_the_rank() -> None:
    scales = lora_scales(_metadata({"unet.r": 16, "unet.lora_alpha": 8, "unet.use_rslora": True}))

    assert scales.scale("unet", MODULE, rank=16) == 8 / math.sqrt(16)


class _TinyUNetPart(torch.nn.Module):
    """Projections named like the UNet's, with a near-miss name (`attn10`) for patterns."""

    def __init__(self):
        super().__init__()
        attention = {name: torch.nn.Linear(8, 8) for name in ("to_q", "to_k")}
        self.blocks = torch.nn.ModuleDict(
            {
                "attn1": torch.nn.ModuleDict(attention),
                "attn10": torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 8)}),
            }
        )


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2}},
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"^blocks.attn10.to_q": 32, "to_k": 1}},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_k": 2}},
        {"r": 16, "lora_alpha": 8, "use_rslora": True},
    ],
    ids=["pattern", "anchored-pattern", "rank-pattern", "rslora"],
)
def test_scales_are_the_ones_peft_gives_its_layers(config: dict) -> None:
    model = inject_adapter_in_model(
        LoraConfig(target_modules=["to_q", "to_k"], **config), _TinyUNetPart()
    )
    scales = lora_scales(_metadata({f"unet.{key}": value for key, value in config.items()}))

    layers = {name: module for name, module in model.named_modules() if hasattr(module, "scaling")}
    assert len(layers) == 3
    for name, layer in layers.items():
        rank = layer.lora_A["default"].weight.shape[0]
        assert scales.scale("unet", name, rank=rank) == pytest.approx(layer.scaling["default"])
    assert scales.has_module_patterns == ("rank_pattern" in config or "alpha_pattern" in config)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({ADAPTER_METADATA_KEY: "{not json"}, "is not JSON"),
        (_metadata([4, 8]), "not a JSON object"),
        (_metadata({"unet.lora_alpha": "8"}), "lora_alpha is not a number"),
        (_metadata({"unet.alpha_pattern": {"(": 2}}), "invalid pattern"),
        (_metadata({"unet.r": 4, "unet.use_dora": True}), "DoRA"),
    ],
)
def test_what_is_no_plain_lora_config_is_refused(metadata: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        lora_scales(metadata)


# --- kohya module names: sd-scripts' SDXL UNet layout and diffusers' -----------------------


def _model_shapes(preset: str) -> dict:
    from sdxl_engine.generation.builder import load_component_config
    from sdxl_engine.lora_files import lora_target_shapes

    return lora_target_shapes(
        load_component_config(preset, "unet_base"),
        load_component_config(preset, "text_encoder"),
        load_component_config(preset, "text_encoder_2"),
    )


@pytest.mark.parametrize("preset", ["tiny", "sdxl"])
def test_every_module_spelt_the_kohya_way_maps_back_to_itself(preset: str) -> None:
    """Underscores for dots lose nothing for any Linear or Conv2d of the three components,
    in diffusers' layout and (UNet) in sd-scripts' own."""
    from tests.community_loras import sgm_module_name

    layers = {"tiny": 1, "sdxl": 2}[preset]
    for component, shapes in _model_shapes(preset).items():
        for module in shapes:
            community = community_module_path(component, module)
            assert kohya_module_path(component, kohya_module_name(community), layers) == community
            assert installed_module_path(component, community) == module
            if component == "unet":
                sgm = sgm_module_name(module, layers, shapes)
                assert is_sgm_module(sgm)
                assert kohya_module_path(component, sgm, layers) == module


@pytest.mark.parametrize(
    ("sgm", "module"),
    [
        # sd-scripts' library/sdxl_model_util.py conversion map, for SDXL Base.
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding.linear_1"),
        ("time_embed_2", "time_embedding.linear_2"),
        ("label_emb_0_0", "add_embedding.linear_1"),
        ("label_emb_0_2", "add_embedding.linear_2"),
        ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
        ("input_blocks_2_0_out_layers_3", "down_blocks.0.resnets.1.conv2"),
        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks_4_0_emb_layers_1", "down_blocks.1.resnets.0.time_emb_proj"),
        (
            "input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
            "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
        ("input_blocks_8_1_proj_out", "down_blocks.2.attentions.1.proj_out"),
        ("middle_block_0_in_layers_2", "mid_block.resnets.0.conv1"),
        (
            "middle_block_1_transformer_blocks_9_attn2_to_out_0",
            "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
        ),
        ("middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
        ("output_blocks_0_0_skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
        ("output_blocks_2_1_proj_in", "up_blocks.0.attentions.2.proj_in"),
        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
        ("output_blocks_8_0_out_layers_3", "up_blocks.2.resnets.2.conv2"),
    ],
)
def test_sd_scripts_sdxl_names_map_onto_diffusers_modules(sgm: str, module: str) -> None:
    assert kohya_module_path("unet", sgm, 2) == module
    assert module in _model_shapes("sdxl")["unet"]


@pytest.mark.parametrize(
    "sgm",
    [
        "input_blocks_3_1_proj_in",  # a downsampler's place holds no attention
        "input_blocks_1_0_norm1",
        "input_blocks_1_2_proj_in",
        "middle_block_3_in_layers_2",
        "middle_block_0_in_layers_0",
        "output_blocks_1_2_conv_x",
        "input_blocks_x",
    ],
)
def test_sd_scripts_names_of_no_linear_or_conv_are_errors(sgm: str) -> None:
    with pytest.raises(EngineError, match="names no Linear or Conv2d module of SDXL's UNet"):
        kohya_module_path("unet", sgm, 2)


def test_sd_scripts_names_need_one_layer_count_for_every_block() -> None:
    with pytest.raises(EngineError, match="block numbers"):
        kohya_module_path("unet", "input_blocks_1_0_in_layers_2", None)
    # Names outside the numbered blocks, and diffusers' layout, need none.
    assert kohya_module_path("unet", "out_2", None) == "conv_out"
    assert kohya_module_path("unet", "down_blocks_0_resnets_1_conv_shortcut", None) == (
        "down_blocks.0.resnets.1.conv_shortcut"
    )


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.hada_t2", "LoHa"),
        ("lora_te1_x.lokr_w2_b", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("unet.x.lora_magnitude_vector", "DoRA"),
        ("lora_unet_x.on_input", "(IA)3"),
        ("lora_unet_x.weight", "(IA)3"),
        ("lora_unet_x.b2.weight", "GLoRA"),
        ("lora_unet_x.oft_blocks", "OFT/BOFT"),
        ("lora_unet_x.lora_mid.weight", "Tucker-decomposed LoCon (lora_mid)"),
        ("unet.x.lora_B.bias", "LoRA bias"),
        ("unet.x.lora.up.bias", "LoRA bias"),
        ("lora_unet_x.lora_down.weight", None),
        ("model.layer.weight", None),
    ],
)
def test_other_adapter_kinds_are_named(key: str, kind: str | None) -> None:
    assert unsupported_kind(key) == kind
