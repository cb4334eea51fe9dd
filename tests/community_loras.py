"""LoRA files laid out the way the community's trainers write them, for the tiny model (or
any SDXL-shaped model): what people upload, and what stock diffusers must read alike.

- `write_kohya_locon`: sd-scripts' `networks.lora` with `--network_args conv_dim=...
  conv_alpha=...` (a LoCon): UNet keys in sd-scripts' own SDXL UNet layout
  (library/sdxl_original_unet.py: `input_blocks_4_1_transformer_blocks_0_ff_net_0_proj`,
  resnets' `in_layers_2` / `out_layers_3` / `emb_layers_1` / `skip_connection`,
  `input_blocks_N_0_op`, `output_blocks_N_2_conv`, `middle_block_1_...`) over every
  Linear and Conv2d of its Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D
  modules, `lora_te1_` / `lora_te2_` keys over the CLIP attention and MLP Linear layers,
  `.alpha` tensors unlike the ranks, and `ss_*` metadata;
- `write_lycoris_locon`: the same modules as LyCORIS' `lycoris.kohya` (algo=locon) writes;
- `write_loha`, `write_lokr`: LyCORIS' LoHa and LoKr keys (refused);
- `write_peft_lora`, `write_diffusers_lora`: every Linear and Conv2d module of the UNet
  and both text encoders, keyed as PEFT (`lora_A`/`lora_B`, adapter config in the header)
  and as diffusers stores them (`lora.down`/`lora_linear_layer.down`).

Text-encoder layers are spelt as transformers 4 named them, and so as community files do
(`text_model.encoder.layers.0.mlp.fc1`), whatever the installed transformers calls them.

Linear factors are down (rank, in) and up (out, rank); Conv2d ones down (rank, in, kh, kw)
and up (out, rank, 1, 1). Values are small and seeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl_engine.lora_files import lora_target_shapes
from sdxl_engine.lora_keys import community_module_path

COMPONENT_FOLDERS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers' ResnetBlock2D members -> sd-scripts' (ldm) names.
_SGM_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_SGM_TOP = {
    "conv_in": "input_blocks_0_0",
    "conv_out": "out_2",
    "time_embedding.linear_1": "time_embed_0",
    "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0",
    "add_embedding.linear_2": "label_emb_0_2",
}


def packaged_model_folder(preset: str, folder: Path) -> Path:
    """A folder laid out like a Base pipeline's, holding only the UNet's and text encoders'
    configs of a packaged preset ("tiny", "sdxl"): what the writers below need, without
    building the model."""
    from sdxl_engine.generation.builder import load_component_config

    names = {
        "unet": "unet_base",
        "text_encoder": "text_encoder",
        "text_encoder_2": "text_encoder_2",
    }
    for component, name in names.items():
        (Path(folder) / component).mkdir(parents=True, exist_ok=True)
        config = load_component_config(preset, name)
        (Path(folder) / component / "config.json").write_text(json.dumps(config))
    return Path(folder)


def model_configs(base_dir: Path) -> dict[str, dict]:
    """The UNet's and both text encoders' configs of a Base pipeline folder."""
    return {
        component: json.loads((Path(base_dir) / component / "config.json").read_text())
        for component in COMPONENT_FOLDERS
    }


def model_shapes(base_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Component -> module path -> weight shape of every Linear and Conv2d module."""
    configs = model_configs(base_dir)
    return lora_target_shapes(configs["unet"], configs["text_encoder"], configs["text_encoder_2"])


def _base(tiny_model_dirs) -> Path:
    return (
        Path(tiny_model_dirs[0]) if isinstance(tiny_model_dirs, tuple | list) else tiny_model_dirs
    )


def sgm_module_name(module: str, layers_per_block: int, modules: Iterable[str]) -> str:
    """A diffusers UNet module path in sd-scripts' SDXL UNet spelling (without `lora_unet_`).

    `modules` are the UNet's module paths (an up level's Upsample2D sits after its
    attention, if the level has one, else right after its resnet)."""
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    per_level = layers_per_block + 1
    parts = module.split(".")
    rest = "_".join(parts[4:])
    if parts[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[
            (parts[1], parts[2])
        ]
        inner = "_".join(parts[3:])
        return f"middle_block_{index}_{_SGM_RESNET.get(inner, inner)}"
    level, kind, layer = int(parts[1]), parts[2], int(parts[3])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks_{(level + 1) * per_level}_0_op"
        number = 1 + level * per_level + layer
    else:
        if kind == "upsamplers":
            has_attention = any(m.startswith(f"up_blocks.{level}.attentions.") for m in modules)
            number = level * per_level + layers_per_block
            return f"output_blocks_{number}_{2 if has_attention else 1}_conv"
        number = level * per_level + layer
    side = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    if kind == "resnets":
        return f"{side}_{number}_0_{_SGM_RESNET[rest]}"
    return f"{side}_{number}_1_{rest}"


def sd_scripts_unet_modules(unet_shapes: Mapping[str, tuple]) -> list[str]:
    """What sd-scripts' networks.lora puts a LoRA on with conv_dim set: every Linear and
    Conv2d inside Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D modules
    (not conv_in, conv_out or the time and added-condition embeddings)."""
    blocks = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")
    return [module for module in unet_shapes if any(block in module for block in blocks)]


def sd_scripts_text_encoder_modules(shapes: Mapping[str, tuple]) -> list[str]:
    """What sd-scripts puts a LoRA on in a CLIP text encoder: the Linear layers of its
    CLIPAttention and CLIPMLP modules (not text_projection)."""
    return [module for module in shapes if ".self_attn." in module or ".mlp." in module]


def _factors(generator, shape: tuple[int, ...], rank: int, magnitude: float):
    out, in_features, *kernel = shape
    down = torch.randn(rank, in_features, *kernel, generator=generator) * magnitude
    up = torch.randn(out, rank, *([1, 1] if kernel else []), generator=generator) * magnitude
    return down, up


def kohya_locon_tensors(
    shapes: Mapping[str, Mapping[str, tuple]],
    layers_per_block: int,
    *,
    rank: int = 4,
    conv_rank: int = 2,
    alpha: float | None = None,
    conv_alpha: float | None = None,
    seed: int = 0,
    text_encoders: bool = True,
    unet_modules: Iterable[str] | None = None,
    magnitude: float = 0.1,
) -> dict[str, torch.Tensor]:
    """sd-scripts LoCon tensors for a model of these shapes (see the module docstring): 3x3
    convs at `conv_rank` / `conv_alpha`, Linear and 1x1 conv modules at `rank` / `alpha`
    (by default alpha = rank / 2 and conv_alpha = 1, as people train them)."""
    alpha = rank / 2 if alpha is None else alpha
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha
    generator = torch.Generator().manual_seed(seed)
    unet_shapes = shapes["unet"]
    chosen = list(unet_modules) if unet_modules is not None else None
    tensors = {}

    def add(name: str, shape: tuple) -> None:
        is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        down, up = _factors(generator, shape, conv_rank if is_3x3 else rank, magnitude)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(conv_alpha if is_3x3 else alpha)

    for module in chosen if chosen is not None else sd_scripts_unet_modules(unet_shapes):
        name = sgm_module_name(module, layers_per_block, unet_shapes)
        add(f"lora_unet_{name}", unet_shapes[module])
    if text_encoders:
        for component, prefix in _KOHYA_TE_PREFIXES.items():
            for module in sd_scripts_text_encoder_modules(shapes[component]):
                name = community_module_path(component, module).replace(".", "_")
                add(prefix + name, shapes[component][module])
    return tensors


def write_kohya_locon(
    path: Path,
    tiny_model_dirs,
    *,
    rank: int = 4,
    conv_rank: int = 2,
    seed: int = 0,
    text_encoders: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """An sd-scripts SDXL LoCon (`networks.lora`, `conv_dim=conv_rank conv_alpha=1`,
    `network_alpha=rank/2`) for the Base model in `tiny_model_dirs` (the fixture's
    (base, refiner) folders, or the base folder), written to `path`."""
    base = _base(tiny_model_dirs)
    layers_per_block = model_configs(base)["unet"]["layers_per_block"]
    tensors = kohya_locon_tensors(
        model_shapes(base),
        layers_per_block,
        rank=rank,
        conv_rank=conv_rank,
        seed=seed,
        text_encoders=text_encoders,
    )
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": "1"}),
        "ss_training_comment": "community-style test LoCon",
        "ss_network_train_unet_only": str(not text_encoders),
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)


def write_lycoris_locon(
    path: Path, tiny_model_dirs, *, rank: int = 4, conv_rank: int = 2, seed: int = 1
) -> Path:
    """A LyCORIS LoCon (`lycoris.kohya`, algo=locon) as it writes one for SDXL trained with
    sd-scripts: the same key style and modules, its own metadata."""
    base = _base(tiny_model_dirs)
    layers_per_block = model_configs(base)["unet"]["layers_per_block"]
    tensors = kohya_locon_tensors(
        model_shapes(base),
        layers_per_block,
        rank=rank,
        conv_rank=conv_rank,
        alpha=float(rank) * 2,
        conv_alpha=float(conv_rank) / 2,
        seed=seed,
    )
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank * 2),
        "ss_network_args": json.dumps(
            {
                "algo": "locon",
                "conv_dim": str(conv_rank),
                "conv_alpha": str(conv_rank / 2),
                "preset": "full",
            }
        ),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def _lycoris_module_names(base: Path, count: int) -> list[tuple[str, tuple]]:
    shapes = model_shapes(base)
    layers_per_block = model_configs(base)["unet"]["layers_per_block"]
    unet = shapes["unet"]
    return [
        (f"lora_unet_{sgm_module_name(m, layers_per_block, unet)}", unet[m])
        for m in sd_scripts_unet_modules(unet)[:count]
    ]


def write_loha(path: Path, tiny_model_dirs, *, rank: int = 2, seed: int = 2) -> Path:
    """A LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, in_features, *kernel) in _lycoris_module_names(_base(tiny_model_dirs), 4):
        flat_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        for w in ("w1", "w2"):
            tensors[f"{name}.hada_{w}_a"] = torch.randn(out, rank, generator=generator) * 0.1
            tensors[f"{name}.hada_{w}_b"] = torch.randn(rank, flat_in, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return Path(path)


def write_lokr(path: Path, tiny_model_dirs, *, seed: int = 3) -> Path:
    """A LyCORIS LoKr (`lokr_w1`, `lokr_w2`, `alpha`): weight = kron(w1, w2)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, in_features, *kernel) in _lycoris_module_names(_base(tiny_model_dirs), 4):
        tensors[f"{name}.lokr_w1"] = torch.randn(2, 2, generator=generator) * 0.1
        tensors[f"{name}.lokr_w2"] = (
            torch.randn(out // 2, in_features // 2, *kernel, generator=generator) * 0.1
        )
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return Path(path)


def _all_module_factors(base: Path, rank: int, seed: int, community: bool):
    """Every module's factors; with `community`, its path spelt as files from transformers
    4 days have it (text encoders' layers under `text_model.`), else as installed."""
    generator = torch.Generator().manual_seed(seed)
    for component, shapes in model_shapes(base).items():
        for module, shape in shapes.items():
            path = community_module_path(component, module) if community else module
            yield component, path, *_factors(generator, shape, rank, 0.1)


def write_peft_lora(path: Path, tiny_model_dirs, *, rank: int = 2, seed: int = 4) -> Path:
    """Every Linear and Conv2d module of the UNet and both text encoders in PEFT's spelling
    (`<component>.<module>.lora_A.weight` / `.lora_B.weight`), with diffusers' per-component
    adapter config in the header saying lora_alpha = 2 x r (so scale 2). Module paths as
    the installed transformers names them: stock diffusers matches the config's
    target_modules against those."""
    tensors, config = {}, {}
    base = _base(tiny_model_dirs)
    for component, module, down, up in _all_module_factors(base, rank, seed, community=False):
        tensors[f"{component}.{module}.lora_A.weight"] = down
        tensors[f"{component}.{module}.lora_B.weight"] = up
    for component, shapes in model_shapes(_base(tiny_model_dirs)).items():
        config.update(
            {
                f"{component}.r": rank,
                f"{component}.lora_alpha": 2 * rank,
                f"{component}.target_modules": sorted(shapes),
            }
        )
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return Path(path)


def write_diffusers_lora(path: Path, tiny_model_dirs, *, rank: int = 2, seed: int = 5) -> Path:
    """Every Linear and Conv2d module of the UNet and both text encoders as diffusers'
    `save_lora_weights` spells them: `unet.<module>.lora.down.weight`,
    `text_encoder[_2].<module>.lora_linear_layer.down.weight`, scale 1 (no alphas), the
    text encoders' layers under `text_model.` as files saved with transformers 4 have them."""
    tensors = {}
    base = _base(tiny_model_dirs)
    for component, module, down, up in _all_module_factors(base, rank, seed, community=True):
        middle = "lora" if component == "unet" else "lora_linear_layer"
        tensors[f"{component}.{module}.{middle}.down.weight"] = down
        tensors[f"{component}.{module}.{middle}.up.weight"] = up
    save_file(tensors, str(path))
    return Path(path)
