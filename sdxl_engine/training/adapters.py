"""The LoRA adapters a run trains: added to the Base UNet (and the text encoders), fresh or
from the weights of the LoRA a run continues, their float32 master weights for the
optimiser, taken out again, and saved in diffusers' own LoRA format."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from transformers import PreTrainedModel

from sdxl_engine.errors import EngineError
from sdxl_engine.files import write_atomically
from sdxl_engine.lora_keys import DOWN, TARGET_PROJECTIONS, split_lora_key

ADAPTER_NAME = "sdxl_service_training"
# The attention projections of the key table: what uploads are checked against.
LORA_TARGET_MODULES = list(TARGET_PROJECTIONS)
# The CLIP text encoders' attention projections, as diffusers' SDXL LoRA script targets.
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_config(rank: int, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules
    )


def add_text_encoder_adapter(
    text_encoder: PreTrainedModel,
    rank: int,
    target_modules: list[str] = TEXT_ENCODER_TARGET_MODULES,
) -> None:
    """PEFT's own injection, recording the config where diffusers keeps a model's adapter
    configs (transformers' add_adapter would need a newer PEFT than is published)."""
    config = lora_config(rank, target_modules)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    # transformers types this with its own PeftConfigLike protocol, whose fields peft's
    # LoraConfig annotates differently; it is the config transformers' add_adapter stores.
    text_encoder.peft_config = {ADAPTER_NAME: config}  # type: ignore[dict-item]


def adapter_targets(parent: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """The modules a continued LoRA adapts, by component: exactly the parent's (canonical
    tensors), by their full module paths, which PEFT's target_modules matches whole."""
    targets: dict[str, set[str]] = {}
    for key in parent:
        lora_key = split_lora_key(key)
        assert lora_key is not None and lora_key.component is not None  # canonical keys
        targets.setdefault(lora_key.component, set()).add(lora_key.module)
    return {component: sorted(modules) for component, modules in targets.items()}


@torch.no_grad()
def load_parent_weights(
    models: Mapping[str, torch.nn.Module], parent: Mapping[str, torch.Tensor]
) -> None:
    """Copies a parent LoRA's canonical tensors into the adapters of `models` (by
    component), whose modules adapter_targets chose. The adapters become float32 first,
    so the optimiser's masters start from the parent's values, not from their rounding
    to the training precision (training.loop takes the masters from them)."""
    for model in models.values():
        cast_training_params(model, dtype=torch.float32)
    for key, tensor in parent.items():
        lora_key = split_lora_key(key)
        assert lora_key is not None and lora_key.component is not None  # canonical keys
        layer = models[lora_key.component].get_submodule(lora_key.module)
        factors = layer.lora_A if lora_key.factor == DOWN else layer.lora_B
        assert isinstance(factors, torch.nn.ModuleDict)  # a PEFT LoRA layer's, by adapter
        factor = factors[ADAPTER_NAME]
        assert isinstance(factor, torch.nn.Linear | torch.nn.Conv2d)
        factor.weight.copy_(tensor)


def remove_adapters(text_encoder: PreTrainedModel) -> None:
    """Puts a text encoder's plain layers back in place of its LoRA layers, as diffusers'
    unload_lora_weights does for text encoders."""
    recurse_remove_peft_layers(text_encoder)
    if getattr(text_encoder, "peft_config", None) is not None:
        del text_encoder.peft_config
        text_encoder._hf_peft_config_loaded = False


class MasterWeights:
    """Float32 copies of half-precision trainable weights, for the optimiser to update.

    For float32 weights (on the CPU) the weights themselves are the masters: no copies.
    """

    def __init__(self, model_parameters: Sequence[torch.Tensor]) -> None:
        self._model = list(model_parameters)
        self._copies = any(parameter.dtype != torch.float32 for parameter in model_parameters)
        self.parameters = (
            [parameter.detach().float().requires_grad_() for parameter in model_parameters]
            if self._copies
            else self._model
        )

    def take_gradients(self) -> None:
        if self._copies:
            for master, parameter in zip(self.parameters, self._model, strict=True):
                master.grad = None if parameter.grad is None else parameter.grad.float()
                parameter.grad = None

    @torch.no_grad()
    def load(self, saved: list[torch.Tensor]) -> None:
        """Takes the values of masters saved from a run of the same adapters."""
        torch._foreach_copy_(
            self.parameters, [tensor.to(self.parameters[0].device) for tensor in saved]
        )
        self.copy_to_model()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if self._copies:
            torch._foreach_copy_(self._model, self.parameters)


def save_lora(
    base: StableDiffusionXLPipeline,
    with_text_encoders: bool,
    output_path: Path,
    metadata: dict[str, str],
) -> str:
    """Save the adapters (the UNet's, and the text encoders' `with_text_encoders`) with
    diffusers' own LoRA writer, adding our metadata to its header; returns the sha256 of
    the file's bytes.

    diffusers writes to a fixed file name and fills the header itself (format, adapter
    config) only with its default writer, so it writes to a scratch folder and the
    result is rewritten atomically to `output_path` with both sets of metadata. The bytes
    are hashed in memory, before they reach the disk, so a file that comes out truncated
    or altered does not match.
    """
    components = {"unet": base.unet}
    if with_text_encoders:
        components.update(text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2)
    layers = {}
    for name, model in components.items():
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        )
        layers[f"{name}_lora_adapter_metadata"] = {
            # Sets become lists in the header; sorted, so the same training gives the same
            # metadata.
            key: sorted(value) if isinstance(value, set) else value
            for key, value in model.peft_config[ADAPTER_NAME].to_dict().items()
        }
    try:
        with tempfile.TemporaryDirectory(prefix="sdxl-lora-") as scratch:
            StableDiffusionXLPipeline.save_lora_weights(
                scratch, weight_name="lora.safetensors", safe_serialization=True, **layers
            )
            with safe_open(Path(scratch, "lora.safetensors"), framework="pt") as written:
                tensors = {key: written.get_tensor(key) for key in written.keys()}
                header_metadata = {**(written.metadata() or {}), **metadata}
        data = safetensors_bytes(tensors, metadata=header_metadata)
        write_atomically(output_path, lambda tmp_path: tmp_path.write_bytes(data))
    except OSError as error:
        raise EngineError(
            f"the LoRA could not be saved to {output_path} ({error}); "
            "check that the session still exists and the disk has space, then train again"
        ) from error
    return hashlib.sha256(data).hexdigest()
