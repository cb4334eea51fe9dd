"""Decompression bombs are refused from the header, before a pixel is decoded."""

import os
import subprocess
import sys

import pytest
from PIL import ImageFile

from core.errors import ServiceError
from sessions_app.images import check_image
from tests.helpers import image_bytes, png_bomb
from tests.processes import REPO

# 30000 x 30000 is over Pillow's own bomb limit; 9000 x 9000 is under it but over ours.
BOMBS = {"30000x30000": (30000, 30000), "9000x9000": (9000, 9000)}
# What decoding either would allocate is 81-900 MB; a header check needs almost nothing.
MAX_MEMORY_GROWTH_MB = 20


@pytest.fixture(scope="module", params=list(BOMBS))
def bomb(request) -> bytes:
    data = png_bomb(*BOMBS[request.param])
    assert len(data) < 200_000
    return data


def test_bomb_is_refused_without_decoding(bomb, monkeypatch):
    def decode(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(ServiceError) as error:
        check_image(bomb)
    assert error.value.status == 400
    assert "more pixels than the limit" in error.value.message


def test_bomb_check_keeps_memory_bounded(bomb, tmp_path):
    """Measured in a fresh process: its peak RSS is not muddied by the test run's models."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    code = (
        "import resource, sys, django; django.setup()\n"
        "from sessions_app.images import check_image\n"
        "from core.errors import ServiceError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    check_image(data)\nexcept ServiceError as error:\n    print(error.message)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "sdxl_service.settings"}
    env["SDXL_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    message, growth_mb = result.stdout.strip().splitlines()
    assert "more pixels than the limit" in message
    assert int(growth_mb) < MAX_MEMORY_GROWTH_MB


def test_image_at_the_pixel_limit_is_accepted(settings):
    settings.SDXL_MAX_UPLOAD_PIXELS = 48 * 40
    assert check_image(image_bytes("PNG", (48, 40))).width == 48
    with pytest.raises(ServiceError, match="more pixels than the limit"):
        check_image(image_bytes("PNG", (49, 40)))
