"""What the benchmark scripts share and none of them owns: the environment record at the
top of each results file, and random LoRA files of a trained LoRA's size."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch


def environment() -> dict:
    """The card, versions, date and command of this run, as `bench/report.py` reads them."""
    import diffusers
    import transformers

    main_spec = sys.modules["__main__"].__spec__  # None for a script run by its path
    script = [f"-m {main_spec.name}"] if main_spec else sys.argv[:1]
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *script, *sys.argv[1:]]),
    }


def random_lora(path: Path, unet_config: dict, seed: int, rank: int = 4) -> Path:
    """A rank-`rank` LoRA on every attention projection, in the diffusers format the
    trainer writes, with factors of a trained LoRA's size (PEFT's gaussian init for the
    down factor, a few thousandths for the up factor): training one would only add time."""
    from safetensors.torch import save_file

    from sdxl_engine.lora_files import unet_lora_target_shapes

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in unet_lora_target_shapes(unet_config).items():
        tensors[f"unet.{module}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) / rank
        )
        tensors[f"unet.{module}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * 2e-3
        )
    save_file(tensors, str(path))
    return path
