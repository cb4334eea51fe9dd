from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_engine.errors import EngineError
from sdxl_engine.generation.builder import build_random_pipelines, load_component_config
from sdxl_engine.generation.pipelines import Pipelines


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_pair_has_sdxl_structure(pipelines: Pipelines) -> None:
    base, refiner = pipelines.base, pipelines.refiner
    te1, te2 = base.text_encoder.config, base.text_encoder_2.config
    time_dim = base.unet.config.addition_time_embed_dim

    assert base.unet.config.addition_embed_type == "text_time"
    assert base.unet.config.use_linear_projection
    assert base.unet.config.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert (
        base.unet.config.projection_class_embeddings_input_dim == 6 * time_dim + te2.projection_dim
    )
    assert refiner.unet.config.addition_embed_type == "text_time"
    assert refiner.unet.config.cross_attention_dim == te2.hidden_size
    assert (
        refiner.unet.config.projection_class_embeddings_input_dim
        == 5 * time_dim + te2.projection_dim
    )
    assert isinstance(base.text_encoder, CLIPTextModel)
    assert isinstance(base.text_encoder_2, CLIPTextModelWithProjection)
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert base.vae_scale_factor == 8
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert base.scheduler.config.timestep_spacing == "leading"
    assert base.config.force_zeros_for_empty_prompt is True
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.config.force_zeros_for_empty_prompt is False

    attention_layers = [m for m in base.unet.modules() if isinstance(m, Attention)]
    assert attention_layers
    for layer in attention_layers:
        assert all(hasattr(layer, name) for name in ("to_q", "to_k", "to_v"))
        assert isinstance(layer.to_out[0], torch.nn.Linear)


def test_refiner_files_share_base_text_encoder_2_and_vae(
    tiny_model_dirs: tuple[Path, Path],
) -> None:
    base, refiner = tiny_model_dirs
    for component in (
        "text_encoder_2/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert _sha256(base / component) == _sha256(refiner / component)
    assert _sha256(base / "unet/diffusion_pytorch_model.safetensors") != _sha256(
        refiner / "unet/diffusion_pytorch_model.safetensors"
    )


def test_tokenizer_folders_are_plain_clip_bpe(
    tiny_model_dirs: tuple[Path, Path], pipelines: Pipelines
) -> None:
    base, refiner = tiny_model_dirs
    for folder in (base / "tokenizer", base / "tokenizer_2", refiner / "tokenizer_2"):
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        assert len(vocab) == 514 and {"<|startoftext|>", "<|endoftext|>", "a</w>"} <= vocab.keys()
        assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2")
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        assert tokenizer.model_max_length == 77

    tokenizer = pipelines.base.tokenizer
    ids = tokenizer(
        "A photo of 🍎, naïve café!", padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < pipelines.base.text_encoder.config.vocab_size
    assert max(ids) < pipelines.base.text_encoder_2.config.vocab_size


def test_existing_pair_is_returned_without_rebuilding(tiny_model_dirs: tuple[Path, Path]) -> None:
    base, refiner = tiny_model_dirs
    weights = base / "unet/diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns

    assert build_random_pipelines("tiny", base.parent) == (base, refiner)
    assert weights.stat().st_mtime_ns == before
    assert sorted(p.name for p in base.parent.iterdir()) == ["base", "refiner"]  # no staging left


def test_same_seed_builds_same_weights(tmp_path: Path, tiny_model_dirs: tuple[Path, Path]) -> None:
    base, _ = build_random_pipelines("tiny", tmp_path)
    for component in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _sha256(base / component) == _sha256(tiny_model_dirs[0] / component)


def test_unknown_builder_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unknown random-model preset"):
        build_random_pipelines("huge", tmp_path)


FULL_SIZE_PARAMETERS = {
    "unet_base": 2_567_463_684,
    "unet_refiner": 2_259_526_660,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


@pytest.mark.parametrize("component", FULL_SIZE_PARAMETERS)
def test_full_size_configs_have_published_parameter_counts(component: str) -> None:
    config = load_component_config("sdxl", component)
    # The meta device allocates no memory, so billions of parameters cost nothing here.
    with torch.device("meta"):
        if component.startswith("unet"):
            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            model = AutoencoderKL.from_config(config)
        elif component == "text_encoder":
            model = CLIPTextModel(CLIPTextConfig(**config))
        else:
            model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    assert (
        sum(parameter.numel() for parameter in model.parameters())
        == FULL_SIZE_PARAMETERS[component]
    )
