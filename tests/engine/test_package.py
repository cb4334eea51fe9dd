from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sdxl_engine

PACKAGE_DIR = Path(sdxl_engine.__file__).parent


def test_light_modules_do_not_import_torch() -> None:
    # The web process imports these (errors, model choice, dataset and LoRA file checks, the
    # LoRA key table, request parameters): it must not pay for torch or diffusers.
    code = (
        "import sys, sdxl_engine, sdxl_engine.source, sdxl_engine.dataset, sdxl_engine.lora_files,"
        " sdxl_engine.lora_formats, sdxl_engine.lora_keys, sdxl_engine.parameters;"
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)); print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_engine_never_imports_django() -> None:
    for module in PACKAGE_DIR.rglob("*.py"):
        source = module.read_text(encoding="utf-8")
        assert "import django" not in source and "from django" not in source, module
