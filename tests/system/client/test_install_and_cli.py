"""The issue's "Done when": the client installed with pip from ./client (into a folder of
its own, so the venv is left as found), then the README's example and the `sdxl` command
end to end against a real `manage.py serve` on the tiny model."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image
from safetensors import safe_open

from tests.helpers import image_bytes
from tests.processes import REPO, free_port

# one_pass: what it tests is the client; the server on PostgreSQL + Redis is test_e2e.py's.
pytestmark = [pytest.mark.e2e, pytest.mark.one_pass]

# The tiny model trains and samples in seconds; the service recipe of the README's example
# (no length given) is capped at this many steps, so it samples and checkpoints at each.
MAX_STEPS = 4


def install_client(target: Path) -> None:
    """pip install ./client --target: offline with the venv's setuptools (the package's
    build backend) where it has it, else with build isolation from the package index."""
    source = target.parent / "client-source"  # a copy: building writes build/ and egg-info
    shutil.copytree(REPO / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target)]
    if importlib.util.find_spec("setuptools") is not None:
        command += ["--no-build-isolation", "--no-index"]
    done = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def venv_has_client() -> bool:
    probe = "import importlib.util as u; print(u.find_spec('sdxl_client') is not None)"
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    return answer.stdout.strip() == "True"


def readme_example() -> str:
    """The ```python block of the README's "Python client" section, as a user copies it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python client section has no python example"
    return match.group(1)


def write_photos(folder: Path) -> None:
    """Three captioned photos in kohya's layout: <stem>.png beside <stem>.txt."""
    folder.mkdir()
    for name, color in (("red", "red"), ("blue", "blue"), ("green", "green")):
        (folder / f"{name}.png").write_bytes(image_bytes("PNG", (72, 64), color))
        (folder / f"{name}.txt").write_text(f"sks, a {color} square")


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", size), path


def lora_keys_and_rank(path: Path) -> tuple[list[str], int]:
    with safe_open(str(path), framework="numpy") as lora:
        keys = list(lora.keys())
        down = next(key for key in keys if re.search(r"(down|lora_A)\.weight$", key))
        return keys, lora.get_slice(down).get_shape()[0]


def test_readme_example_and_cli(service_processes, tmp_path):
    assert not venv_has_client()
    target = tmp_path / "site"
    install_client(target)
    assert not venv_has_client()  # installed beside the venv, not into it
    _, url = service_processes.serve(SDXL_MAX_TRAINING_STEPS=str(MAX_STEPS))

    env = {
        **{k: v for k, v in service_processes.env.items() if not k.startswith("SDXL_")},
        "PYTHONPATH": str(target),
        "SDXL_URL": url,
    }

    def run(*command: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )

    def sdxl(*args: str) -> subprocess.CompletedProcess[str]:
        return run(str(target / "bin" / "sdxl"), *args)  # the console script pip wrote

    # The README's example, verbatim, in a folder with photos/ as it describes.
    example_dir = tmp_path / "example"
    example_dir.mkdir()
    write_photos(example_dir / "photos")
    done = run(sys.executable, "-c", readme_example(), cwd=example_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\ncompleted lora_1.safetensors\n" in done.stdout  # after the run's events
    assert done.stdout.startswith("started\n")
    [image] = (example_dir / "out").glob("*.png")
    assert_png(image, (64, 64))
    [lora] = (example_dir / "out").glob("*.safetensors")
    keys, rank = lora_keys_and_rank(lora)
    assert rank == 32 and any("unet" in key for key in keys)  # the service recipe's rank

    # The CLI: a session, a folder of photos, a run with samples, a generation, the file.
    created = sdxl("--json", "session", "create")
    assert created.returncode == 0, created.stderr
    session = str(json.loads(created.stdout)["session_id"])

    write_photos(tmp_path / "photos")
    uploaded = sdxl("upload", session, str(tmp_path / "photos"))
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.strip() == f"uploaded 3 image(s) to session {session}"
    assert re.search(r"uploading  [\d,]+/[\d,]+ bytes", uploaded.stderr)

    trained = sdxl(
        "train", session, "--steps", str(MAX_STEPS), "--rank", "4", "--resolution", "64",
        "--sample-every", "2", "--sample-prompts", '["sks"]',
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert re.search(r"run \d+ completed: lora_1\.safetensors", trained.stdout)
    samples = re.findall(r"sample  step (\d+)  (\S+)", trained.stderr)
    assert [step for step, _ in samples] == ["2", "4"], trained.stderr
    for _, sample_url in samples:
        answer = requests.get(sample_url, timeout=10)
        assert answer.headers["Content-Type"] == "image/png" and answer.content[:4] == b"\x89PNG"

    generated = sdxl(
        "--json", "generate", "sks, a red square", "--lora", f"{session}:1@0.8",
        "--steps", "5", "--seed", "7", "--num-images", "2", "-o", str(tmp_path / "images"),
    )  # fmt: skip
    assert generated.returncode == 0, generated.stdout + generated.stderr
    generation = json.loads(generated.stdout)
    assert generation["status"] == "completed" and len(generation["files"]) == 2
    for path in generation["files"]:
        assert Path(path).parent == tmp_path / "images"
        assert_png(Path(path), (64, 64))

    for lora_format, prefix in (("diffusers", "unet."), ("kohya", "lora_unet_")):
        downloaded = sdxl(
            "--json", "lora", "download", session, "--format", lora_format,
            "-o", str(tmp_path / lora_format) + "/",
        )  # fmt: skip
        assert downloaded.returncode == 0, downloaded.stderr
        path = Path(json.loads(downloaded.stdout)["path"])
        keys, rank = lora_keys_and_rank(path)
        assert rank == 4 and all(key.startswith(prefix) for key in keys), keys[:3]

    runs = sdxl("runs", "--json")
    [listed] = [s for s in json.loads(runs.stdout)["sessions"] if s["session_id"] == session]
    assert listed["training"]["status"] == "completed"

    # Exit codes: refused (4xx) with the API's message as JSON, unreachable, usage.
    refused = sdxl("--json", "cancel", session)
    assert refused.returncode == 3
    assert json.loads(refused.stdout)["http_status"] == 409
    unreachable = sdxl("--url", f"http://127.0.0.1:{free_port()}", "runs")
    assert unreachable.returncode == 4 and "sdxl: error" in unreachable.stderr
    assert sdxl("runs", "--steps", "3").returncode == 2
