"""Decompression bombs are refused from the header, before a pixel is decoded; masks are
stored greyscale at their image's size, refused when they cannot fit it."""

import io
import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image, ImageFile

from core.errors import ServiceError
from sessions_app import images
from sessions_app.images import check_image, checked_mask, mask_png
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


def _grey(data: bytes) -> Image.Image:
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "PNG"
    return stored


def test_a_mask_of_another_scale_is_stored_as_a_greyscale_png_of_the_images_size():
    mask = Image.new("RGB", (24, 20), "black")
    mask.paste((255, 255, 255), (0, 0, 12, 20))  # the left half is the subject

    stored = _grey(mask_png(mask, 48, 40))

    assert (stored.mode, stored.size) == ("L", (48, 40))
    assert stored.getpixel((5, 20)) == 255 and stored.getpixel((40, 20)) == 0
    # Within a pixel's rounding is the same ratio: 1000x667 halved is 500x333.
    assert _grey(mask_png(Image.new("L", (500, 333), 255), 1000, 667)).size == (1000, 667)


def test_a_transparent_pixel_of_a_mask_counts_as_black():
    mask = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    mask.putpixel((0, 0), (255, 255, 255, 255))
    stored = _grey(mask_png(mask, 4, 4))
    assert stored.getpixel((0, 0)) == 255 and stored.getpixel((3, 3)) == 0


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((40, 48), "mask_base64: the mask is 40x48 and its image 48x40: a mask needs its"),
        ((48, 38), "the mask is 48x38 and its image 48x40"),
    ],
)
def test_a_mask_of_another_aspect_ratio_is_refused_naming_both_sizes(size, message):
    with pytest.raises(ServiceError, match=message) as refusal:
        mask_png(Image.new("L", size, 255), 48, 40, field="mask_base64")
    assert refusal.value.status == 400


def test_an_all_black_mask_is_refused():
    with pytest.raises(ServiceError, match="mask: the mask is entirely black"):
        mask_png(Image.new("RGBA", (48, 40), (255, 255, 255, 0)), 48, 40)


def test_mask_bytes_are_checked_as_images_are():
    with pytest.raises(ServiceError, match="a_mask.png does not hold a PNG"):
        checked_mask(b"not an image", 48, 40, field="a_mask.png")
    with pytest.raises(ServiceError, match="m: the image has more pixels than the limit"):
        checked_mask(png_bomb(9000, 9000), 9000, 9000, field="m")


def test_an_8192_square_photo_is_refused_from_its_header_naming_it_and_its_size(monkeypatch):
    """The default limit (40 megapixels) holds any SDXL training photo; 8192x8192 (67 Mi
    pixels, a few KB as a PNG) took ~245 MB to decode and was accepted."""

    def decode(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(ServiceError) as error:
        check_image(png_bomb(8192, 8192), field="huge.png")
    assert error.value.status == 400
    assert error.value.message.startswith("huge.png: the image has more pixels than the limit")
    assert "8192x8192" in error.value.message


def test_decoding_waits_for_the_process_pixel_budget(settings, monkeypatch):
    """Four threads checking real images at once, with a budget of one image's pixels:
    never two decoded images in memory at a time."""
    settings.SDXL_DECODE_PIXEL_BUDGET = 48 * 40
    data = image_bytes("PNG", (48, 40))
    decoding, most = [0], [0]
    guard = threading.Lock()
    load = ImageFile.ImageFile.load

    def counted_load(self):
        with guard:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        time.sleep(0.05)  # long enough for the other threads to arrive
        try:
            return load(self)
        finally:
            with guard:
                decoding[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
    threads = [threading.Thread(target=check_image, args=(data,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_a_decode_that_cannot_get_the_budget_answers_503(settings, monkeypatch):
    settings.SDXL_DECODE_PIXEL_BUDGET = 48 * 40
    monkeypatch.setattr(images, "DECODE_WAIT_S", 0.01)
    with images.decode_budget(48 * 40), pytest.raises(ServiceError) as error:
        check_image(image_bytes("PNG", (48, 40)))
    assert (error.value.status, error.value.retry_after) == (503, 5)
    # The budget is given back: the same image decodes now.
    assert check_image(image_bytes("PNG", (48, 40))).width == 48
