from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sdxl_engine

PACKAGE_DIR = Path(sdxl_engine.__file__).parent
REPO = PACKAGE_DIR.parent
RUFF = Path(sys.executable).parent / "ruff"
HEAVY_PACKAGES = ("torch", "diffusers", "transformers", "peft")
TORCH_SIDE = ("training", "generation")  # the sub-packages that import torch


def _light_modules() -> list[str]:
    """Every module at sdxl_engine's top: what the web process may import."""
    return sorted(f"sdxl_engine.{path.stem}" for path in PACKAGE_DIR.glob("*.py"))


def test_every_top_level_module_imports_without_torch() -> None:
    # The web process imports the top level (errors, parameters, model choice, dataset and
    # LoRA file checks, image output...): it must not pay for torch or diffusers. Each
    # module is imported in turn in a fresh interpreter, and the heavy packages it brought
    # in are named against it.
    code = (
        "import importlib, json, sys\n"
        f"modules, heavy = {_light_modules()!r}, {HEAVY_PACKAGES!r}\n"
        "brought = {}\n"
        "for module in modules:\n"
        "    importlib.import_module(module)\n"
        "    found = sorted(name for name in heavy if name in sys.modules)\n"
        "    if found:\n"
        "        brought[module] = found\n"
        "        break\n"
        "print(json.dumps(brought))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == {}


def test_the_torch_side_is_in_sub_packages() -> None:
    sub_packages = sorted(path.parent.name for path in PACKAGE_DIR.glob("*/__init__.py"))
    assert sub_packages == sorted(TORCH_SIDE)
    assert "sdxl_engine.errors" in _light_modules()
    assert not {f"sdxl_engine.{name}" for name in TORCH_SIDE} & set(_light_modules())


def _ruff_codes(source: str, path: str) -> list[str]:
    """The rules ruff, with the project's configuration, reports for `source` as if it
    were the file at `path` (relative to the repository)."""
    result = subprocess.run(
        [str(RUFF), "check", "--no-cache", "--output-format", "json"]
        + ["--stdin-filename", str(REPO / path), "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return [violation["code"] for violation in json.loads(result.stdout)]


def test_ruff_bans_a_module_level_torch_import_in_web_code() -> None:
    # The rule is live: TID253 in pyproject.toml reports a module-level import of the
    # torch side in a web module, and leaves a function-local one alone.
    for heavy in ("torch", "sdxl_engine.training", "sdxl_engine.generation.batch"):
        at_module_level = f"import {heavy}\n\n\ndef run():\n    return {heavy}\n"
        assert _ruff_codes(at_module_level, "training_app/services/probe.py") == ["TID253"]
        assert _ruff_codes(at_module_level, "sdxl_engine/probe.py") == ["TID253"]
    function_local = "def run():\n    import torch\n\n    return torch\n"
    assert _ruff_codes(function_local, "training_app/services/probe.py") == []
    torch_side = "import torch\n\n\ndef run():\n    return torch\n"
    assert _ruff_codes(torch_side, "sdxl_engine/training/probe.py") == []


def test_engine_never_imports_django() -> None:
    for module in PACKAGE_DIR.rglob("*.py"):
        source = module.read_text(encoding="utf-8")
        assert "import django" not in source and "from django" not in source, module
