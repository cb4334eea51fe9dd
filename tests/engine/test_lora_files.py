from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdxl_engine.errors import EngineError
from sdxl_engine.lora_files import inspect_lora_file, read_lora_metadata


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


def test_missing_file_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="could not be read"):
        read_lora_metadata(tmp_path / "missing.safetensors")
