"""LoRA file formats: the one canonical form the service stores, and kohya's, for other tools.

Canonical is what the trainer writes through diffusers' own serialisation: UNet pairs as
`unet.<module path>.lora.down.weight` / `.lora.up.weight` (4-D for a Conv2d module: down
rank x in x kh x kw, up out x rank x 1 x 1), text-encoder pairs as
`text_encoder[_2].<module path>.lora_linear_layer.down.weight` / `.up.weight`, the way
diffusers spells them, and every module at scale 1 (alpha equal to its rank), so the
file needs no alphas. Uploads in other forms (PEFT `lora_A`/`lora_B`, diffusers' older
attention-processor keys, kohya) are rewritten into it with their alphas folded into the
up-weights: the adapter computes exactly what it did. Every form's keys and each module's
alpha are read through sdxl_engine.lora_keys, as the upload check and the in-place merge
read them.

Kohya's form (sd-scripts; read by AUTOMATIC1111, ComfyUI, diffusers) is
`lora_unet_` / `lora_te1_` / `lora_te2_` + `<module path, dots as underscores>` +
`.lora_down.weight` / `.lora_up.weight` / `.alpha`, with `ss_*` metadata that tells those
tools it is an SDXL LoRA. Reading it, module names in sd-scripts' own SDXL UNet layout
(`input_blocks_4_1_...`) and in diffusers' (`down_blocks_1_attentions_0_...`) are both mapped
onto diffusers' module paths by sdxl_engine.lora_keys.kohya_module_path, key by key: a key
that maps nowhere is an error, never dropped. (diffusers' own kohya converter is not used
for reading: it drops sd-scripts' block names silently when a file mixes both layouts, and
mis-maps `add_embedding_linear_1` in diffusers' layout.)

Checking whether a file is canonical reads only its header; converting imports torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from sdxl_engine.errors import EngineError
from sdxl_engine.files import write_atomically
from sdxl_engine.lora_files import read_lora_header
from sdxl_engine.lora_keys import (
    ADAPTER_METADATA_KEY,
    ALPHA,
    DIFFUSERS,
    DIFFUSERS_SUFFIXES,
    DOWN,
    KOHYA,
    KOHYA_PREFIXES,
    KOHYA_SUFFIXES,
    PEFT,
    PEFT_MODEL_PREFIX,
    PEFT_SUFFIXES,
    TEXT_ENCODERS,
    UNET,
    UP,
    LoraKey,
    community_module_path,
    component_of,
    factor_of,
    installed_module_path,
    kohya_module_name,
    kohya_module_path,
    lora_scales,
    split_lora_key,
    unsupported_message,
)
from sdxl_engine.source import model_name

if TYPE_CHECKING:  # for annotations only: converting imports torch when it runs
    import torch

# SDXL's UNet has two resnets per down block: what sd-scripts' SDXL block numbers assume.
SDXL_LAYERS_PER_BLOCK = 2
KOHYA_BASE_MODEL_VERSION = "sdxl_base_v1-0"
KOHYA_NETWORK_MODULE = "networks.lora"
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
# Where our trainer writes the Base model's name (sdxl_engine.training.caching).
BASE_MODEL_METADATA_KEY = "sdxl_service.base_model"


def is_kohya(keys: Iterable[str]) -> bool:
    return any(key.startswith(tuple(KOHYA_PREFIXES)) for key in keys)


def is_canonical(path: Path) -> bool:
    """Whether the file is already in canonical form; reads the header only (no torch)."""
    header = read_lora_header(Path(path))
    scales = lora_scales(header.get("__metadata__", {}))
    entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if not entries or scales.has_module_patterns:
        return False
    for key, entry in entries.items():
        lora_key = split_lora_key(key)
        if not _is_canonical_key(lora_key):
            return False
        if lora_key.factor == DOWN and (
            not entry["shape"] or scales.scale(*lora_key.module_id, rank=entry["shape"][0]) != 1.0
        ):
            return False
    return True


def _is_canonical_key(lora_key: LoraKey | None) -> TypeGuard[LoraKey]:
    return (
        lora_key is not None
        and lora_key.form == DIFFUSERS
        and lora_key.component is not None
        and lora_key.factor != ALPHA
        and installed_module_path(lora_key.component, lora_key.module) == lora_key.module
    )


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


def canonical_tensors(
    path: Path, layers_per_block: int = SDXL_LAYERS_PER_BLOCK
) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA at `path` (any supported form) in canonical form, on the
    CPU: what a run continuing it loads (sdxl_engine.continuation)."""
    return to_canonical(*_read(path), layers_per_block)


def kohya_lora_bytes(path: Path, base_model: str) -> bytes:
    """The LoRA at `path` as a kohya safetensors file, ready to send.

    `base_model` names the model it was trained on (kohya's `ss_sd_model_name`) when the
    file does not say so itself. A file not yet canonical (stored before uploads were
    converted) is made canonical first.
    """
    from safetensors.torch import save

    tensors, metadata = _read(path)
    kohya = to_kohya(to_canonical(tensors, metadata))
    ranks = Counter(int(tensor.shape[0]) for key, tensor in kohya.items() if factor_of(key) == DOWN)
    rank = ranks.most_common(1)[0][0]
    kept = {k: v for k, v in metadata.items() if k != ADAPTER_METADATA_KEY}
    if BASE_MODEL_METADATA_KEY in kept:
        # Files trained before model names were written hold the server's folder.
        kept[BASE_MODEL_METADATA_KEY] = model_name(kept[BASE_MODEL_METADATA_KEY])
    kohya_metadata = {
        **kept,
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION,
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": str(rank),
        # Canonical files run every module at scale 1, so alpha equals the rank.
        "ss_network_alpha": str(rank),
        "ss_sd_model_name": kept.get(BASE_MODEL_METADATA_KEY, model_name(base_model)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
    }
    return save(kohya, metadata=kohya_metadata)


def to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors in kohya's form: `lora_unet_` / `lora_te1_` / `lora_te2_` and the
    module path with underscores for dots (diffusers' block names, `down_blocks_1_...`,
    which AUTOMATIC1111, ComfyUI and diffusers map onto SDXL's blocks), each module's alpha
    a float32 scalar equal to its rank (canonical modules run at scale 1)."""
    import torch

    prefixes: dict[str | None, str] = {
        UNET: "lora_unet_",
        TEXT_ENCODERS[0]: "lora_te1_",
        TEXT_ENCODERS[1]: "lora_te2_",
    }
    kohya = {}
    for key, tensor in tensors.items():
        lora_key = split_lora_key(key)
        if not _is_canonical_key(lora_key):
            raise EngineError(f"{key} is not a canonical LoRA key; store the file through upload")
        module = community_module_path(lora_key.component, lora_key.module)
        name = prefixes[lora_key.component] + kohya_module_name(module)
        kohya[name + KOHYA_SUFFIXES[lora_key.factor]] = tensor
        if lora_key.factor == DOWN:
            kohya[name + KOHYA_SUFFIXES[ALPHA]] = torch.tensor(float(tensor.shape[0]))
    return kohya


def to_canonical(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
) -> dict[str, torch.Tensor]:
    """Tensors of a kohya, PEFT or diffusers LoRA in canonical form, alphas folded in."""
    if not tensors:
        raise EngineError("the file holds no tensors; upload a LoRA .safetensors file")
    if is_kohya(tensors):
        folded = _with_scales_folded(tensors, metadata, KOHYA)
        canonical = {}
        for key, tensor in folded.items():
            lora_key = _folded_key(key)
            module = kohya_module_path(lora_key.component, lora_key.module, layers_per_block)
            canonical[_canonical_key(lora_key, module)] = tensor.contiguous()
    else:
        peft = _with_scales_folded(_diffusers_to_peft(tensors), metadata, PEFT)
        canonical = {}
        for key, tensor in peft.items():
            lora_key = _folded_key(key)
            canonical[_canonical_key(lora_key, lora_key.module)] = tensor.contiguous()
    # Every pair must land on its own module: two spellings of one module, or a rename
    # that merged keys, would lose a pair.
    pairs = sum(factor_of(key) in (DOWN, UP) for key in tensors)
    if len(canonical) != pairs:
        raise EngineError(
            f"the file's {pairs} LoRA weights name only {len(canonical)} distinct module "
            "weights (one module spelt twice?); upload a LoRA with one pair per module"
        )
    return canonical


def _folded_key(key: str) -> LoraKey:
    """What a key _with_scales_folded kept names (a down or up weight, always)."""
    lora_key = split_lora_key(key)
    if lora_key is None:
        raise EngineError(unsupported_message(key))
    return lora_key


def _canonical_key(lora_key: LoraKey, module: str) -> str:
    """The canonical key of a factor of `module` (its diffusers path in either spelling)."""
    module = installed_module_path(lora_key.component, module)
    return LoraKey(DIFFUSERS, lora_key.component, module, lora_key.factor).in_form(DIFFUSERS)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    metadata: dict[str, str] = read_lora_header(path).get("__metadata__", {})
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, ValueError) as error:
        raise EngineError(f"{path.name} could not be read as safetensors ({error})") from error


def _with_scales_folded(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], form: str
) -> dict[str, torch.Tensor]:
    """The down/up pairs of `tensors`, all spelt in `form`, each up-weight multiplied by its
    module's scale (lora_keys.lora_scales) and the alphas dropped: the pairs alone then
    compute what the file did.

    Raises EngineError for anything but plain pairs (LoHa, LoKr, DoRA, IA3, biases...,
    named by lora_keys.unsupported_message), for half pairs and alphas without a pair,
    and for per-module alphas or ranks in the adapter config: uploads have always refused
    those, as their patterns are regexes over module paths, which kohya's form spells
    otherwise. A kohya alpha of 0 means no scaling, as in sd-scripts and LyCORIS.
    """
    split = {key: split_lora_key(key) for key in tensors}
    others = sorted(
        key
        for key, lora_key in split.items()
        if lora_key is None or (lora_key.factor != ALPHA and lora_key.form != form)
    )
    if others:
        more = f" (and {len(others) - 1} more unsupported entries)" if len(others) > 1 else ""
        raise EngineError(unsupported_message(others[0]) + more)
    keys = {key: lora_key for key, lora_key in split.items() if lora_key is not None}
    modules: dict[str, dict[tuple[str | None, str], torch.Tensor]] = {
        factor: {} for factor in (DOWN, UP, ALPHA)
    }
    for key, lora_key in keys.items():
        modules[lora_key.factor][lora_key.module_id] = tensors[key]
    # Each half needs the other; an alpha needs the pair it scales.
    partner = {DOWN: UP, UP: DOWN, ALPHA: DOWN}
    unmatched = sorted(
        key
        for key, lora_key in keys.items()
        if lora_key.module_id not in modules[partner[lora_key.factor]]
    )
    if unmatched:
        raise EngineError(
            f"LoRA entries without their module's down/up pair: {unmatched[0]}"
            + (f" and {len(unmatched) - 1} more" if len(unmatched) > 1 else "")
        )
    alphas = {module: float(alpha.float().item()) for module, alpha in modules[ALPHA].items()}
    if form == KOHYA:
        # sd-scripts and LyCORIS read an alpha of 0 as "no scaling" (alpha = rank).
        alphas = {module: alpha for module, alpha in alphas.items() if alpha != 0.0}
    scales = lora_scales(metadata, alphas)
    if scales.has_module_patterns:
        raise EngineError(
            "LoRA uses per-module alphas or ranks (alpha_pattern, rank_pattern); "
            "upload a plain LoRA"
        )
    folded = {}
    for key, lora_key in keys.items():
        if lora_key.factor == UP:
            rank = modules[DOWN][lora_key.module_id].shape[0]
            folded[key] = _scaled(tensors[key], scales.scale(*lora_key.module_id, rank=rank))
        elif lora_key.factor == DOWN:
            folded[key] = tensors[key]
    return folded


def _diffusers_to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers or PEFT LoRA, in any of diffusers' spellings, keyed in PEFT's form under
    its component; alphas keep their keys."""
    from diffusers.utils.state_dict_utils import (
        DIFFUSERS_OLD_TO_PEFT,
        convert_state_dict,
        convert_unet_state_dict_to_peft,
    )

    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(PEFT_MODEL_PREFIX)
        component = component_of(key)
        if component is None:
            # A bare UNet adapter, as PEFT's get_peft_model_state_dict(unet) writes it.
            component, key = UNET, f"{UNET}.{key}"
        by_component.setdefault(component, {})[key] = tensor
    # diffusers' text-encoder map lacks the UNet's spelling, which some text-encoder LoRAs use.
    text_mapping = {
        **DIFFUSERS_OLD_TO_PEFT,
        **{DIFFUSERS_SUFFIXES[UNET][factor]: PEFT_SUFFIXES[factor] for factor in (DOWN, UP)},
    }
    peft: dict[str, torch.Tensor] = {}
    for component, part in by_component.items():
        peft.update(
            convert_unet_state_dict_to_peft(part)
            if component == UNET
            else convert_state_dict(part, text_mapping)
        )
    return peft


def _scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor * factor`, computed in float32 and kept in the tensor's own precision."""
    if factor == 1.0:
        return tensor
    return (tensor.float() * factor).to(tensor.dtype)
