"""The README's `curl -F` uploads, run as written against the real web server (gunicorn,
as `serve` runs it), with files of the sizes people send: a 5 MB photo, a 23 MB LoRA."""

import hashlib
import io
import json
import subprocess

import numpy as np
import pytest
import requests
from PIL import Image

from sessions_app import storage
from tests.helpers import lora_bytes, tiny_unet_lora_shapes
from training_app.models import LoraArtifact

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(service_processes) -> str:
    return service_processes.gunicorn(workers=1, threads=4)


def _curl(*arguments: str) -> dict:
    done = subprocess.run(
        ["curl", "-s", "--fail-with-body", *arguments], capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _photo(size_mb: float) -> bytes:
    """A PNG of noise (it does not compress): about `size_mb` MB."""
    side = int((size_mb * 1024 * 1024 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@pytest.mark.one_pass
def test_readme_curl_uploads_of_a_5_mb_photo_and_a_23_mb_lora(server, tmp_path):
    session_id = requests.get(f"{server}/create_session", timeout=10).json()["session_id"]
    photo = tmp_path / "photo.png"
    photo.write_bytes(_photo(5.1))
    assert photo.stat().st_size > 5 * 1024 * 1024
    # Rank 720 on every attention projection of the tiny model: 23 MB, as an SDXL rank-8 LoRA.
    lora = tmp_path / "my_lora.safetensors"
    lora.write_bytes(lora_bytes(tiny_unet_lora_shapes(), rank=720, fill=0.001))
    assert lora.stat().st_size > 23 * 1000 * 1000

    images = _curl(
        "-F", f"image=@{photo}", "-F", "caption=ohwx dog on the grass",
        f"{server}/sessions/{session_id}/images",
    )  # fmt: skip
    uploaded = _curl(
        "-F", f"session_id={session_id}", "-F", f"lora=@{lora}",
        "-F", "filename=my_lora.safetensors", f"{server}/upload_lora",
    )  # fmt: skip

    (image,) = images["images"]
    assert (images["status"], image["caption"], image["format"]) == (
        "success",
        "ohwx dog on the grass",
        "PNG",
    )
    stored = storage.session_dir(session_id) / "0" / "0.png"
    assert stored.read_bytes() == photo.read_bytes()
    assert uploaded == {"status": "success", "lora_filename": "my_lora.safetensors", "iteration": 1}
    artifact = LoraArtifact.objects.get(session_id=session_id)
    assert artifact.sha256 == hashlib.sha256(lora.read_bytes()).hexdigest()
