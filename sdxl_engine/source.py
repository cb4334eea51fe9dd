"""Which SDXL weights a worker uses, decided once per worker process."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from sdxl_engine.errors import EngineError

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"

# SDXL_MODEL_PRESET value -> the builder preset whose random weights it uses.
RANDOM_PRESETS = {"tiny": "tiny", "sdxl-random": "sdxl"}
PRESETS = ("hub", *RANDOM_PRESETS)
_PACKAGED_CONFIGS = Path(__file__).parent / "configs"
# A model component's config.json, as diffusers and transformers write it.
ModelConfig = dict[str, Any]


@dataclass(frozen=True)
class ModelSource:
    base: str  # hub id or local folder for the Base pipeline
    refiner: str  # hub id or local folder for the Refiner pipeline
    preset: str  # "tiny", "sdxl-random" or "hub" (real weights from base/refiner)
    reason: str  # one human-readable line: which models and why (logged by the worker)
    device: str  # "cuda" or "cpu"

    @property
    def base_name(self) -> str:
        """The Base model's name for files others see (a LoRA's metadata, an image's
        infotext `Model:`): the hub id, a local folder's name, or the random preset's name;
        never a path of this server."""
        return self.preset if self.preset in RANDOM_PRESETS else model_name(self.base)

    @property
    def refiner_name(self) -> str:
        """The Refiner's name, as base_name's."""
        if self.preset in RANDOM_PRESETS:
            return f"{self.preset}-refiner"
        return model_name(self.refiner)


def model_name(model: str) -> str:
    """A model's name without a path of this server: a hub id (`org/name`) as it is, a
    local folder (absolute, relative or `~`) by its own name."""
    if "\\" in model:  # a Windows path
        return PureWindowsPath(model).name or model
    path = Path(model)
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return path.name or model
    return model


def plan_model_source(
    preset: str | None, base: str, refiner: str, cache_dir: Path, *, cuda: bool
) -> ModelSource:
    """What resolve_model_source (generation.builder) picks, without building anything or
    asking torch.

    Random-weight presets point at `cache_dir/<preset>/base` and `.../refiner`, which
    may not be built yet.
    """
    base = base or DEFAULT_BASE_MODEL
    refiner = refiner or DEFAULT_REFINER_MODEL
    device = "cuda" if cuda else "cpu"
    chosen = (preset or "").strip().lower() or "auto"

    if chosen == "auto":
        if cuda:
            reason = f"CUDA found: using SDXL_BASE_MODEL={base} and SDXL_REFINER_MODEL={refiner}"
            return ModelSource(
                base=base, refiner=refiner, preset="hub", reason=reason, device=device
            )
        chosen = "tiny"
        reason = (
            "no CUDA device: using the built-in tiny random-weight model (noise images); "
            "set SDXL_MODEL_PRESET=hub to force real weights"
        )
    elif chosen == "hub":
        reason = (
            f"SDXL_MODEL_PRESET=hub: using SDXL_BASE_MODEL={base} "
            f"and SDXL_REFINER_MODEL={refiner} on {device}"
        )
        return ModelSource(base=base, refiner=refiner, preset="hub", reason=reason, device=device)
    elif chosen in RANDOM_PRESETS:
        reason = (
            f"SDXL_MODEL_PRESET={chosen}: using the {chosen} random-weight model "
            f"(noise images) on {device}"
        )
    else:
        raise EngineError(
            f"unknown SDXL_MODEL_PRESET {preset!r}: use one of {', '.join(PRESETS)}, "
            "or leave it empty to choose automatically"
        )
    folder = Path(cache_dir) / chosen
    return ModelSource(
        base=str(folder / "base"),
        refiner=str(folder / "refiner"),
        preset=chosen,
        reason=reason,
        device=device,
    )


# The native image side of the weights each preset loads, for the web process to fill a
# request's defaults with: real SDXL (hub, sdxl-random) keeps 1024, whatever hub model is
# named; the tiny model's comes from its packaged config.
REAL_NATIVE_SIDE = 1024


def planned_preset(preset: str | None) -> str:
    """The preset a worker on this machine resolves `preset` (SDXL_MODEL_PRESET) to: "hub",
    "tiny" or "sdxl-random", as plan_model_source, but judging auto by cuda_likely() (no
    torch imported, no CUDA initialised), so the web process may ask. Workers on another
    machine than the web process should have SDXL_MODEL_PRESET set explicitly."""
    chosen = (preset or "").strip().lower() or "auto"
    if chosen == "auto":
        return "hub" if cuda_likely() else "tiny"
    return chosen


def planned_native_side(preset: str | None) -> int:
    """The native image side (width = height) of the model a worker on this machine loads
    for `preset`: 64 for the tiny model, 1024 for real SDXL."""
    chosen = planned_preset(preset)
    if chosen in RANDOM_PRESETS and RANDOM_PRESETS[chosen] != "sdxl":
        return _packaged_native_side(RANDOM_PRESETS[chosen])
    return REAL_NATIVE_SIDE


@functools.cache
def _packaged_native_side(builder_preset: str) -> int:
    # Read once: every /txt2img and /train_lora answer asks, and the packaged files never change.
    unet = _packaged_unet_config(builder_preset)
    vae = _packaged_config(builder_preset, "vae.json")
    side: int = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return side


@functools.cache
def cuda_likely() -> bool:
    """Whether torch.cuda.is_available() would say True in a worker on this machine, told
    without importing torch or touching the driver: the installed torch is a CUDA (or ROCm)
    build (its version.py), a GPU's driver is loaded (/proc/driver/nvidia/gpus/ has a GPU,
    or /dev/kfd for ROCm) and CUDA_VISIBLE_DEVICES hides none of them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    spec = importlib.util.find_spec("torch")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return False
    try:
        version = (Path(next(iter(locations))) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return False

    def built_with(name: str) -> bool:
        return re.search(rf"^{name}\b[^=]*=\s*['\"]", version, re.MULTILINE) is not None

    nvidia = Path("/proc/driver/nvidia/gpus")
    if built_with("cuda") and nvidia.is_dir() and any(nvidia.iterdir()):
        return True
    return built_with("hip") and Path("/dev/kfd").exists()


@dataclass(frozen=True)
class WeightsStatus:
    present: bool
    where: str  # the folder they load from, or where they would be downloaded to


def weights_status(model: str, hub_cache: Path | None = None) -> WeightsStatus:
    """Whether a pipeline (local folder or hub id) can load without downloading anything.

    A local folder needs its model_index.json; a hub id needs model_index.json and UNet
    weights in the Hugging Face cache (`hub_cache`, by default the one huggingface_hub
    uses). Nothing is downloaded.
    """
    folder = Path(model).expanduser()
    if folder.is_dir() or model.startswith(("/", ".", "~")):
        return WeightsStatus((folder / "model_index.json").is_file(), str(folder))
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import CacheNotFound

    cache = str(hub_cache or HF_HUB_CACHE)
    index = try_to_load_from_cache(model, "model_index.json", cache_dir=cache)
    if not isinstance(index, str):
        return WeightsStatus(False, cache)
    try:
        cached = scan_cache_dir(cache)
    except CacheNotFound:
        return WeightsStatus(False, cache)
    unet_weights = {
        cached_file.file_name
        for repo in cached.repos
        if repo.repo_id == model and repo.repo_type == "model"
        for revision in repo.revisions
        for cached_file in revision.files
        if cached_file.file_path.parent.name == "unet"
    }
    present = any(name.endswith((".safetensors", ".bin")) for name in unet_weights)
    return WeightsStatus(present, str(Path(index).parent))


def base_unet_configs(preset: str | None, base: str) -> list[ModelConfig]:
    """The config of every Base UNet a worker may load for these settings, read without
    torch or weights (for checks in the web process); empty when none can be known here.

    Auto is two candidates: the web process cannot tell whether the worker has a GPU (real
    SDXL) or not (the tiny model). A hub id other than SDXL's counts only if the Hugging
    Face cache already holds its config.
    """
    chosen = (preset or "").strip().lower() or "auto"
    if chosen in RANDOM_PRESETS:
        return [_packaged_unet_config(RANDOM_PRESETS[chosen])]
    base = base or DEFAULT_BASE_MODEL
    configs = [config] if (config := _real_unet_config(base)) is not None else []
    if chosen == "auto":
        configs.append(_packaged_unet_config("tiny"))
    return configs


# The components a LoRA may touch -> the packaged config file of each (configs/<preset>/).
_LORA_COMPONENT_CONFIGS = {
    "unet": "unet_base.json",
    "text_encoder": "text_encoder.json",
    "text_encoder_2": "text_encoder_2.json",
}


def base_lora_configs(preset: str | None, base: str) -> list[Mapping[str, ModelConfig | None]]:
    """Like base_unet_configs, for every component a LoRA may touch: for each Base
    pipeline a worker may load, the configs of its "unet", "text_encoder" and
    "text_encoder_2" (None for one that cannot be known here), read without torch."""
    chosen = (preset or "").strip().lower() or "auto"
    if chosen in RANDOM_PRESETS:
        return [_packaged_configs(RANDOM_PRESETS[chosen])]
    base = base or DEFAULT_BASE_MODEL
    real: dict[str, ModelConfig | None] = {
        component: _real_config(base, component, file)
        for component, file in _LORA_COMPONENT_CONFIGS.items()
    }
    configs: list[Mapping[str, ModelConfig | None]] = [real] if real["unet"] is not None else []
    if chosen == "auto":
        configs.append(_packaged_configs("tiny"))
    return configs


def _packaged_configs(builder_preset: str) -> dict[str, ModelConfig]:
    return {
        component: _packaged_config(builder_preset, file)
        for component, file in _LORA_COMPONENT_CONFIGS.items()
    }


def _packaged_config(builder_preset: str, file: str) -> ModelConfig:
    return _read_config(_PACKAGED_CONFIGS / builder_preset / file)


def _packaged_unet_config(builder_preset: str) -> ModelConfig:
    return _packaged_config(builder_preset, _LORA_COMPONENT_CONFIGS["unet"])


def _real_unet_config(base: str) -> ModelConfig | None:
    return _real_config(base, "unet", _LORA_COMPONENT_CONFIGS["unet"])


def _real_config(base: str, component: str, packaged_file: str) -> ModelConfig | None:
    """A component's config: the local folder's, SDXL Base's published one (packaged), or
    the Hugging Face cache's; None when none of them has it."""
    local = Path(base) / component / "config.json"
    if local.is_file():
        return _read_config(local)
    if base == DEFAULT_BASE_MODEL:
        return _packaged_config("sdxl", packaged_file)  # SDXL Base's published config
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base, f"{component}/config.json")
    except ValueError:  # not a valid hub id either
        return None
    return _read_config(Path(cached)) if isinstance(cached, str) else None


def _read_config(path: Path) -> ModelConfig:
    config: ModelConfig = json.loads(path.read_text(encoding="utf-8"))
    return config
