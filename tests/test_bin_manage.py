"""bin/manage: manage.py with the project's own virtualenv, from any directory."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MANAGE = REPO / "bin" / "manage"


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "python").exists(),
    reason="no .venv in the checkout: bin/setup (bin/test runs it) creates it",
)
def test_bin_manage_check_runs_from_another_directory(tmp_path):
    env = {**os.environ, "SDXL_DATA_DIR": str(tmp_path / "data")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [str(MANAGE), "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_bin_manage_without_a_venv_says_to_run_bin_setup(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "bin").mkdir(parents=True)
    shutil.copy2(MANAGE, checkout / "bin" / "manage")
    result = subprocess.run(
        [str(checkout / "bin" / "manage"), "check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "run bin/setup first" in result.stderr and ".venv is missing" in result.stderr
