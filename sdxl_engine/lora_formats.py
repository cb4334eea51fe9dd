"""LoRA file formats: the one canonical form the service stores, and kohya's, for other tools.

Canonical is what the trainer writes through diffusers' own serialisation: UNet pairs as
`unet.<module path>.lora.down.weight` / `.lora.up.weight`, text-encoder pairs (uploads only)
as `text_encoder[_2].<module path>.lora_linear_layer.down.weight` / `.up.weight`, the way
diffusers spells them, and every module at scale 1 (alpha equal to its rank), so the
file needs no alphas. Uploads in other forms (PEFT `lora_A`/`lora_B`, diffusers' older
attention-processor keys, kohya) are rewritten into it with their alphas folded into the
up-weights: the adapter computes exactly what it did.

Kohya's form (sd-scripts; read by AUTOMATIC1111, ComfyUI, diffusers) is
`lora_unet_<module path, dots as underscores>.lora_down.weight` / `.lora_up.weight` /
`.alpha`, with `ss_*` metadata that tells those tools it is an SDXL LoRA.

Checking whether a file is canonical reads only its header; converting imports torch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sdxl_engine.errors import EngineError
from sdxl_engine.files import write_atomically
from sdxl_engine.lora_files import read_lora_header

UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_CANONICAL_SUFFIXES = {
    UNET: (".lora.down.weight", ".lora.up.weight"),
    "text_encoder": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    "text_encoder_2": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
}
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# PEFT's own save_pretrained puts this before every key.
_PEFT_MODEL_PREFIX = "base_model.model."
# diffusers keeps the PEFT adapter config of each component in this header entry.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# SDXL's UNet has two resnets per down block: what sd-scripts' SDXL block numbers assume.
SDXL_LAYERS_PER_BLOCK = 2
KOHYA_BASE_MODEL_VERSION = "sdxl_base_v1-0"
KOHYA_NETWORK_MODULE = "networks.lora"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def is_kohya(keys) -> bool:
    return any(key.startswith(_KOHYA_PREFIXES) for key in keys)


def is_canonical(path: Path) -> bool:
    """Whether the file is already in canonical form; reads the header only (no torch)."""
    header = read_lora_header(Path(path))
    metadata = header.get("__metadata__", {})
    keys = [key for key in header if key != "__metadata__"]
    if not keys:
        return False
    for key in keys:
        component = key.split(".", 1)[0]
        if component not in _CANONICAL_SUFFIXES or not key.endswith(_CANONICAL_SUFFIXES[component]):
            return False
    return all(scale == 1.0 for scale in _adapter_scales(metadata).values())


def canonical_lora_file(
    source: Path, target: Path, layers_per_block: int = SDXL_LAYERS_PER_BLOCK
) -> dict[str, str]:
    """Write `source` (any supported LoRA form) to `target` in canonical form, atomically.

    Returns the target's metadata. `layers_per_block` is the base UNet's; it is needed
    only to read kohya files that number SDXL's blocks the way sd-scripts does
    (`input_blocks_4_1_...`). Raises EngineError if the file is no LoRA we can convert.
    """
    from safetensors.torch import save_file

    tensors, metadata = _read(source)
    canonical = to_canonical(tensors, metadata, layers_per_block)
    # The scales are now folded into the weights: the adapter config no longer applies.
    kept = {k: v for k, v in metadata.items() if k != ADAPTER_METADATA_KEY}
    write_atomically(Path(target), lambda temp: save_file(canonical, str(temp), metadata=kept))
    return kept


def kohya_lora_bytes(path: Path, base_model: str) -> bytes:
    """The LoRA at `path` as a kohya safetensors file, ready to send.

    `base_model` names the model it was trained on (kohya's `ss_sd_model_name`) when the
    file does not say so itself. A file not yet canonical (stored before uploads were
    converted) is made canonical first.
    """
    from safetensors.torch import save

    tensors, metadata = _read(path)
    kohya = to_kohya(to_canonical(tensors, metadata))
    ranks = Counter(
        int(tensor.shape[0]) for key, tensor in kohya.items() if key.endswith(".lora_down.weight")
    )
    rank = ranks.most_common(1)[0][0]
    kohya_metadata = {
        **{k: v for k, v in metadata.items() if k != ADAPTER_METADATA_KEY},
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION,
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(rank),
        # Canonical files run every module at scale 1, so alpha equals the rank.
        "ss_network_alpha": str(rank),
        "ss_sd_model_name": metadata.get("sdxl_service.base_model", base_model),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
    }
    return save(kohya, metadata=kohya_metadata)


def to_kohya(tensors: dict[str, Any]) -> dict[str, Any]:
    """Canonical tensors in kohya's form, through diffusers' own PEFT-to-kohya converter.

    diffusers spells the block names the diffusers way (`lora_unet_down_blocks_1_...`);
    AUTOMATIC1111 and ComfyUI map those onto SDXL's blocks, and diffusers reads them back.
    """
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft = {}
    for key, tensor in tensors.items():
        component = key.split(".", 1)[0]
        down, up = _CANONICAL_SUFFIXES.get(component, (None, None))
        if down and key.endswith(down):
            peft[key[: -len(down)] + _PEFT_SUFFIXES[0]] = tensor
        elif up and key.endswith(up):
            peft[key[: -len(up)] + _PEFT_SUFFIXES[1]] = tensor
        else:
            raise EngineError(f"{key} is not a canonical LoRA key; store the file through upload")
    kohya = convert_state_dict_to_kohya(peft)
    # diffusers writes each alpha as an integer tensor; sd-scripts writes floats.
    return {
        key: tensor.to(torch.float32) if key.endswith(".alpha") else tensor
        for key, tensor in kohya.items()
    }


def to_canonical(
    tensors: dict[str, Any],
    metadata: dict[str, str],
    layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
) -> dict[str, Any]:
    """Tensors of a kohya, PEFT or diffusers LoRA in canonical form, alphas folded in."""
    if not tensors:
        raise EngineError("the file holds no tensors; upload a LoRA .safetensors file")
    if is_kohya(tensors):
        peft = _kohya_to_peft(dict(tensors), layers_per_block)
    else:
        peft = _diffusers_to_peft(dict(tensors), _adapter_scales(metadata))
    canonical = {}
    for key, tensor in peft.items():
        component = key.split(".", 1)[0]
        for peft_suffix, canonical_suffix in zip(
            _PEFT_SUFFIXES, _CANONICAL_SUFFIXES[component], strict=True
        ):
            if key.endswith(peft_suffix):
                canonical[key[: -len(peft_suffix)] + canonical_suffix] = tensor.contiguous()
    return canonical


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_lora_header(path).get("__metadata__", {})
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, ValueError) as error:
        raise EngineError(f"{path.name} could not be read as safetensors ({error})") from error


def _kohya_to_peft(tensors: dict[str, Any], layers_per_block: int) -> dict[str, Any]:
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    # Fold each module's alpha / rank into its up-weight first: the converted file then
    # needs no alphas, and diffusers' converter sees only down/up pairs.
    for alpha_key in [key for key in tensors if key.endswith(".alpha")]:
        module = alpha_key[: -len(".alpha")]
        down, up = f"{module}.lora_down.weight", f"{module}.lora_up.weight"
        if down not in tensors or up not in tensors:
            raise EngineError(f"kohya LoRA has {alpha_key} without its lora_down/lora_up pair")
        alpha = float(tensors.pop(alpha_key).float().item())
        tensors[up] = _scaled(tensors[up], alpha / tensors[down].shape[0])
    _refuse_unsupported(tensors, {".lora_down.weight", ".lora_up.weight"})
    try:
        tensors = _maybe_map_sgm_blocks_to_diffusers(
            tensors, SimpleNamespace(layers_per_block=layers_per_block)
        )
        converted, _alphas = _convert_non_diffusers_lora_to_diffusers(tensors)
    except (KeyError, ValueError, IndexError) as error:
        raise EngineError(f"kohya LoRA could not be converted ({error})") from error
    unet = {k: v for k, v in converted.items() if k.startswith(f"{UNET}.")}
    text = {k: v for k, v in converted.items() if not k.startswith(f"{UNET}.")}
    # diffusers' converter gives its older attention-processor spelling; its own maps take
    # that to PEFT's (the UNet's and the text encoders' differ).
    return {
        **convert_unet_state_dict_to_peft(unet),
        **convert_state_dict(text, DIFFUSERS_OLD_TO_PEFT),
    }


def _diffusers_to_peft(tensors: dict[str, Any], scales: dict[str, float]) -> dict[str, Any]:
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    by_component: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(_PEFT_MODEL_PREFIX)
        component = key.split(".", 1)[0]
        if component not in _CANONICAL_SUFFIXES:
            # A bare UNet adapter, as PEFT's get_peft_model_state_dict(unet) writes it.
            component, key = UNET, f"{UNET}.{key}"
        by_component.setdefault(component, {})[key] = tensor
    text_mapping = {**DIFFUSERS_OLD_TO_PEFT, ".lora.down": ".lora_A", ".lora.up": ".lora_B"}
    peft = {}
    for component, part in by_component.items():
        converted = (
            convert_unet_state_dict_to_peft(part)
            if component == UNET
            else convert_state_dict(part, text_mapping)
        )
        scale = scales.get(component, 1.0)
        alphas = {k[: -len(".alpha")]: v for k, v in converted.items() if k.endswith(".alpha")}
        for key, tensor in converted.items():
            if key.endswith(_PEFT_SUFFIXES[1]):
                module = key[: -len(_PEFT_SUFFIXES[1])]
                if module in alphas:
                    rank = converted[module + _PEFT_SUFFIXES[0]].shape[0]
                    tensor = _scaled(tensor, float(alphas.pop(module).float().item()) / rank)
                elif scale != 1.0:
                    tensor = _scaled(tensor, scale)
            if not key.endswith(".alpha"):
                peft[key] = tensor
        if alphas:
            raise EngineError(f"LoRA has alphas without weights: {', '.join(sorted(alphas))}")
    _refuse_unsupported(peft, set(_PEFT_SUFFIXES))
    return peft


def _refuse_unsupported(tensors: dict[str, Any], suffixes: set[str]) -> None:
    """Only plain LoRA pairs convert exactly; DoRA, biases and the like do not."""
    others = sorted(key for key in tensors if not key.endswith(tuple(suffixes)))
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise EngineError(
            f"unsupported LoRA entries ({shown}); upload a plain LoRA (no DoRA, LoHa or biases)"
        )
    halves = Counter(
        key[: -len(suffix)] for key in tensors for suffix in suffixes if key.endswith(suffix)
    )
    unpaired = sorted(module for module, count in halves.items() if count != 2)
    if unpaired:
        raise EngineError(f"LoRA modules without both down and up weights: {unpaired[0]} ...")


def _adapter_scales(metadata: dict[str, str]) -> dict[str, float]:
    """Each component's LoRA scale (alpha / r) from diffusers' adapter-config header entry."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise EngineError(f"the header's {ADAPTER_METADATA_KEY} is not JSON") from error
    scales = {}
    for component in (UNET, *TEXT_ENCODERS):
        rank, alpha = config.get(f"{component}.r"), config.get(f"{component}.lora_alpha")
        if rank is None or alpha is None:
            continue
        if (
            config.get(f"{component}.alpha_pattern")
            or config.get(f"{component}.rank_pattern")
            or config.get(f"{component}.use_dora")
        ):
            raise EngineError(
                f"LoRA uses per-module alphas or ranks, or DoRA, for its {component}; "
                "upload a plain LoRA"
            )
        root = math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank
        scales[component] = alpha / root
    return scales


def _scaled(tensor, factor: float):
    """`tensor * factor`, computed in float32 and kept in the tensor's own precision."""
    if factor == 1.0:
        return tensor
    return (tensor.float() * factor).to(tensor.dtype)
