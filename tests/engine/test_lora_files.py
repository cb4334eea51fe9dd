from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.builder import load_component_config
from sdxl_engine.lora_files import (
    check_lora,
    inspect_lora_file,
    lora_target_shapes,
    read_lora_header,
    read_lora_metadata,
    unet_lora_target_shapes,
)
from tests.helpers import (
    HOSTILE_LORAS,
    ONE_TINY_MODULE,
    hostile_lora,
    lora_bytes,
    safetensors_assembled,
    safetensors_parts,
)


def test_inspects_a_trained_lora(trained_lora: Path) -> None:
    info = inspect_lora_file(trained_lora)

    assert info.size_bytes == trained_lora.stat().st_size
    assert info.sha256 == hashlib.sha256(trained_lora.read_bytes()).hexdigest()
    assert info.key_count > 0 and info.key_count % 2 == 0
    assert info.rank == 4
    assert info.metadata == read_lora_metadata(trained_lora)
    assert info.metadata["sdxl_service.rank"] == "4"


def test_detects_rank_of_kohya_style_files(tmp_path: Path) -> None:
    path = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(8, 16),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(16, 8),
        },
        str(path),
    )
    info = inspect_lora_file(path)
    assert (info.rank, info.key_count, info.metadata) == (8, 2, {})


@pytest.mark.parametrize(("text_encoder_rank", "rank"), [(8, 8), (4, None)])
def test_rank_counts_the_down_weights_of_every_component(
    tmp_path: Path, text_encoder_rank: int, rank: int | None
) -> None:
    path = tmp_path / "with_text_encoder.safetensors"
    save_file(
        {
            "unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.zeros(8, 16),
            "unet.mid_block.attentions.0.proj_in.lora.up.weight": torch.zeros(16, 8),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": (
                torch.zeros(text_encoder_rank, 16)
            ),
            "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": (
                torch.zeros(16, text_encoder_rank)
            ),
        },
        str(path),
    )
    assert inspect_lora_file(path).rank == rank


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a safetensors file at all",
        (5).to_bytes(8, "little") + b"[1,2]",
        (1000).to_bytes(8, "little") + b"{}",
    ],
)
def test_unreadable_files_are_engine_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(EngineError, match="bad.safetensors is not a readable safetensors file"):
        inspect_lora_file(path)


def test_truncated_file_is_an_engine_error(trained_lora: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained_lora.read_bytes()[:-100])
    with pytest.raises(EngineError, match="invalid entry"):
        inspect_lora_file(truncated)


# The defects HOSTILE_LORAS lists that the header alone shows (the metadata's size and
# contents are the upload's to judge: training_app.services.loras).
_HEADER_DEFECTS = [
    defect
    for defect in HOSTILE_LORAS
    if defect not in ("a 65 KB __metadata__", "an adapter config of 60,000 nested [")
]


@pytest.mark.parametrize("defect", _HEADER_DEFECTS)
def test_hostile_headers_are_engine_errors_naming_the_problem(tmp_path, defect) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(hostile_lora(defect))
    with pytest.raises(EngineError) as error:
        read_lora_header(path)
    assert str(error.value).startswith("hostile.safetensors is not a readable safetensors file")
    assert HOSTILE_LORAS[defect] in str(error.value)


def test_what_only_the_safetensors_library_refuses_is_refused_in_its_words(tmp_path) -> None:
    header, data = safetensors_parts(lora_bytes(shapes=ONE_TINY_MODULE))
    first = next(iter(header))
    header[first]["dtype"] = "F33"  # no dtype of ours: its byte count goes unchecked here
    path = tmp_path / "odd.safetensors"
    path.write_bytes(safetensors_assembled(header, data))
    with pytest.raises(EngineError, match="the safetensors library refuses it: .*`F33`"):
        read_lora_header(path)


def test_missing_file_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="could not be read"):
        read_lora_metadata(tmp_path / "missing.safetensors")


# --- Checking that a file is an SDXL LoRA for the model -----------------------------------


def _unet_config(preset: str) -> dict:
    return load_component_config(preset, "unet_base")


@pytest.mark.parametrize("preset", ["tiny", "sdxl"])
def test_target_shapes_from_the_config_are_the_models_own(preset: str) -> None:
    """Derived without torch; compared with the modules diffusers actually builds."""
    config = _unet_config(preset)
    with torch.device("meta"):  # shapes only: no memory, even at full SDXL size
        unet = UNet2DConditionModel.from_config(config)
    actual = {
        name: tuple(module.weight.shape)
        for name, module in unet.named_modules()
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    }
    assert unet_lora_target_shapes(config) == actual
    assert len(actual) == {"tiny": 64, "sdxl": 560}[preset]


def test_target_shapes_refuse_unknown_block_types() -> None:
    config = {**_unet_config("tiny"), "down_block_types": ["DownBlock2D", "SimpleCrossAttnDown"]}
    with pytest.raises(EngineError, match="cannot tell the LoRA shapes"):
        unet_lora_target_shapes(config)


def lora_tensors(shapes: dict[str, tuple[int, int]], rank: int = 2, dtype=torch.float32) -> dict:
    """A small random LoRA in diffusers' naming for the projections in `shapes`."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        down = torch.randn(rank, in_features, generator=generator).to(dtype)
        tensors[f"unet.{module}.lora.down.weight"] = down
        tensors[f"unet.{module}.lora.up.weight"] = torch.zeros(out_features, rank, dtype=dtype)
    return tensors


def _model_shapes(preset: str) -> dict:
    return lora_target_shapes(
        _unet_config(preset),
        load_component_config(preset, "text_encoder"),
        load_component_config(preset, "text_encoder_2"),
    )


@pytest.fixture
def tiny_projections() -> dict[str, tuple[int, int]]:
    """The tiny UNet's attention projections, which training targets."""
    return unet_lora_target_shapes(_unet_config("tiny"))


@pytest.fixture
def tiny_shapes() -> dict:
    """Every Linear and Conv2d module of the tiny UNet and text encoders."""
    return _model_shapes("tiny")


@pytest.mark.parametrize("preset", ["tiny", "sdxl"])
def test_model_shapes_are_every_linear_and_conv_of_the_three_components(preset: str) -> None:
    shapes = _model_shapes(preset)
    counts = {component: len(modules) for component, modules in shapes.items()}
    expected = {
        "tiny": {"unet": 125, "text_encoder": 12, "text_encoder_2": 13},
        "sdxl": {"unet": 794, "text_encoder": 72, "text_encoder_2": 193},
    }
    assert counts == expected[preset]
    unet = shapes["unet"]
    width = {"tiny": 32, "sdxl": 320}[preset]
    assert unet["conv_in"] == (width, 4, 3, 3)
    assert unet["down_blocks.0.resnets.0.time_emb_proj"] == (width, 4 * width)
    assert unet["down_blocks.0.downsamplers.0.conv"] == (width, width, 3, 3)
    assert unet["up_blocks.1.resnets.0.conv_shortcut"][2:] == (1, 1)
    assert "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in unet
    # As the installed transformers names them (5: CLIPTextModel without `text_model.`).
    assert "encoder.layers.1.mlp.fc2" in shapes["text_encoder"]
    assert "text_model.encoder.layers.1.mlp.fc2" in shapes["text_encoder_2"]
    assert "text_projection" in shapes["text_encoder_2"]
    assert "text_projection" not in shapes["text_encoder"]


def test_a_component_without_config_is_unknown() -> None:
    assert lora_target_shapes(_unet_config("tiny"), None, None)["text_encoder"] is None


def _saved(tmp_path: Path, tensors: dict, name: str = "lora.safetensors") -> Path:
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_a_trained_lora_fits_its_model(trained_lora: Path, tiny_shapes) -> None:
    assert check_lora(trained_lora, tiny_shapes).rank == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_peft_and_diffusers_naming_in_any_float_dtype_fit(
    tmp_path, tiny_shapes, tiny_projections, dtype
) -> None:
    tensors = lora_tensors(tiny_projections, dtype=dtype)
    peft_named = {
        key.replace("lora.down", "lora_A").replace("lora.up", "lora_B"): value
        for key, value in tensors.items()
    }
    assert check_lora(_saved(tmp_path, tensors), tiny_shapes).rank == 2
    assert check_lora(_saved(tmp_path, peft_named, "peft.safetensors"), tiny_shapes)


def test_a_lora_for_full_size_sdxl_does_not_fit_the_tiny_model(tmp_path, tiny_shapes) -> None:
    projections = unet_lora_target_shapes(_unet_config("sdxl"))
    path = _saved(tmp_path, lora_tensors(dict(list(projections.items())[:8])))
    assert check_lora(path, _model_shapes("sdxl"))  # it does fit SDXL
    with pytest.raises(EngineError, match="adds a 640 x 640 weight, but this model's Linear is"):
        check_lora(path, tiny_shapes)  # the same modules, narrower in the tiny model
    deep = {k: v for k, v in projections.items() if k.startswith("down_blocks.2.")}
    path = _saved(tmp_path, lora_tensors(deep), "deep.safetensors")
    with pytest.raises(EngineError, match="is no Linear or Conv2d module of this model's unet"):
        check_lora(path, tiny_shapes)  # the tiny UNet has no third down block


def test_wrong_projection_shape_is_named(tmp_path, tiny_shapes) -> None:
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    path = _saved(tmp_path, lora_tensors({module: (64, 32)}))
    with pytest.raises(EngineError, match=rf"{re.escape(module)} adds a 64 x 32 weight, but"):
        check_lora(path, tiny_shapes)
    assert check_lora(path)  # consistent in itself: fine when the model is unknown


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: {"text_encoder.layer.lora.down.weight": torch.zeros(2, 4)}, "is no LoRA"),
        (lambda t: {**t, "unet.conv_in.lora.down.weight": torch.zeros(2, 4)}, "has no up weight"),
        (lambda t: {**t, "unet.something.to_q.weight": torch.zeros(4, 4)}, "is no LoRA"),
        (lambda t: {**t, "unet.conv_in.hada_w1_a": torch.zeros(4, 4)}, "LoHa is not supported"),
        (lambda t: {**t, "unet.conv_in.lora_A.bias": torch.zeros(4)}, "LoRA bias is not sup"),
        (lambda t: {**t, "unet.conv_in.alpha": torch.tensor(2.0)}, "is not a LoRA down/up"),
        (
            lambda t: {
                **t,
                "text_encoder.text_model.mlp.fc1.lora_linear_layer.down.weight": torch.zeros(2, 32),
                "text_encoder.text_model.mlp.fc1.lora_linear_layer.up.weight": torch.zeros(37, 2),
            },
            "text_encoder.text_model.mlp.fc1 is no Linear or Conv2d module of this model's text",
        ),
        (
            lambda t: {
                **t,
                "unet.conv_in.lora.down.weight": torch.zeros(2, 4),
                "unet.conv_in.lora.up.weight": torch.zeros(32, 2),
            },
            "unet.conv_in adds a 32 x 4 weight, but this model's Conv2d is 32 x 4 x 3 x 3",
        ),
        (
            lambda t: {
                **t,
                "unet.conv_in.lora.down.weight": torch.zeros(2, 4, 3, 3),
                "unet.conv_in.lora.up.weight": torch.zeros(32, 2, 3, 3),
            },
            "unet.conv_in has a 3x3 up kernel",
        ),
        (
            lambda t: {
                **t,
                "unet.conv_in.lora.down.weight": torch.zeros(2, 4, 3, 3),
                "unet.conv_in.lora.up.weight": torch.zeros(32, 2),
            },
            "unet.conv_in has a 4-D down weight but a 2-D up weight",
        ),
        (lambda t: {k: v for k, v in t.items() if ".up." not in k}, "has no up weight"),
        (
            lambda t: {k: (v[:1] if k.endswith("down.weight") else v) for k, v in t.items()},
            "has down rank 1 but up rank 2",
        ),
        (lambda t: {k: v.flatten() for k, v in t.items()}, "neither a Linear (2-D) nor a Conv2d"),
        (lambda t: {k: v.to(torch.int32) for k, v in t.items()}, "not a float type"),
        (lambda t: {}, "it holds no tensors"),
    ],
)
def test_files_that_are_no_lora_are_refused_naming_why(
    tmp_path, tiny_shapes, tiny_projections, change, problem
):
    tensors = lora_tensors(dict(list(tiny_projections.items())[:4]))
    path = _saved(tmp_path, change(tensors))
    with pytest.raises(EngineError, match=re.escape(problem)):
        check_lora(path, tiny_shapes)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_values_are_refused(
    tmp_path, tiny_shapes, tiny_projections, bad_value, dtype
) -> None:
    tensors = lora_tensors(tiny_projections, dtype=dtype)
    key = sorted(tensors)[7]
    tensors[key] = tensors[key].clone()
    tensors[key][0, -1] = bad_value
    path = _saved(tmp_path, tensors)
    with pytest.raises(EngineError, match=rf"{re.escape(key)} holds NaN or infinite values"):
        check_lora(path, tiny_shapes)


def test_largest_finite_values_are_fine(tmp_path, tiny_shapes, tiny_projections) -> None:
    tensors = lora_tensors(tiny_projections, dtype=torch.float16)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], torch.finfo(torch.float16).max)
    assert check_lora(_saved(tmp_path, tensors), tiny_shapes)


def test_byte_range_must_match_the_shape(tmp_path, tiny_shapes) -> None:
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    header = {
        f"unet.{module}.lora.down.weight": {
            "dtype": "F32",
            "shape": [2, 64],
            "data_offsets": [0, 8],
        },
        f"unet.{module}.lora.up.weight": {
            "dtype": "F32",
            "shape": [64, 2],
            "data_offsets": [8, 16],
        },
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(16))
    with pytest.raises(EngineError, match="invalid entry"):
        check_lora(path, tiny_shapes)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_CreatesMarkerWhenUnpickled(marker)))
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"unet.x.to_q.lora.down.weight": torch.zeros(2, 2)}, torch_file)
    for candidate in (path, torch_file):
        with pytest.raises(EngineError, match="is not a readable safetensors file"):
            check_lora(candidate)
    assert not marker.exists()


class _CreatesMarkerWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_lora_configs_of_each_base_the_worker_may_load(tmp_path: Path) -> None:
    from sdxl_engine.source import base_lora_configs

    tiny = {name: load_component_config("tiny", name) for name in ("unet_base", "text_encoder")}
    (config,) = base_lora_configs("tiny", "")
    assert config["unet"] == tiny["unet_base"]
    assert config["text_encoder"] == tiny["text_encoder"]
    assert config["text_encoder_2"] == load_component_config("tiny", "text_encoder_2")
    # Auto: real SDXL (the default hub id's published configs) or the tiny model.
    sdxl, tiny_again = base_lora_configs(None, "")
    assert sdxl["text_encoder_2"] == load_component_config("sdxl", "text_encoder_2")
    assert tiny_again == config
    # A local folder's own configs; a component it lacks is unknown.
    folder = tmp_path / "base"
    for component in ("unet", "text_encoder"):
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(json.dumps({"marker": component}))
    (local,) = base_lora_configs("hub", str(folder))
    assert local == {
        "unet": {"marker": "unet"},
        "text_encoder": {"marker": "text_encoder"},
        "text_encoder_2": None,
    }
