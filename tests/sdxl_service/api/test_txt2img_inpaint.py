"""/txt2img's inpainting and outpainting fields through the API: checked (400 naming the
field, nothing recorded), recorded in the row and the answer, written into the infotext;
the mask kept beside the row."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdxl_engine.image_output import read_infotext
from sdxl_engine.inpaint_images import blur_mask
from tests.helpers import b64, image_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation
from training_app.services.generations.lifecycle import (
    INIT_IMAGE_NAME,
    MASK_IMAGE_NAME,
    generations_dir,
)

pytestmark = pytest.mark.django_db

SMALL = {"prompt": "x", "steps": 5, "refiner": "none", "seed": 3}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _picture() -> np.ndarray:
    small = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC))


def _mask(size=(64, 64), box=(20, 20, 44, 44)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return mask


PICTURE = _picture()
INIT = b64(_png(PICTURE))
MASK = b64(_png(_mask()))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mask_base64": MASK}, "mask_base64"),
        ({"init_image_base64": INIT, "mask_base64": "not base64!"}, "mask_base64"),
        ({"init_image_base64": INIT, "mask_base64": b64(b"not an image")}, "mask_base64"),
        # Nothing white: nothing would be repainted.
        (
            {"init_image_base64": INIT, "mask_base64": b64(image_bytes("PNG", (64, 64), "black"))},
            "mask_base64",
        ),
        # Another aspect ratio than the init image's.
        (
            {"init_image_base64": INIT, "mask_base64": b64(_png(_mask((64, 32), (0, 0, 8, 8))))},
            "mask_base64",
        ),
        ({"init_image_base64": INIT, "mask_blur": 4}, "mask_blur"),
        ({"init_image_base64": INIT, "mask_base64": MASK, "mask_blur": -1}, "mask_blur"),
        ({"init_image_base64": INIT, "mask_base64": MASK, "mask_blur": 65}, "mask_blur"),
        ({"init_image_base64": INIT, "inpaint_area": "masked"}, "inpaint_area"),
        ({"init_image_base64": INIT, "mask_base64": MASK, "inpaint_area": "all"}, "inpaint_area"),
        ({"init_image_base64": INIT, "inpaint_padding": 8}, "inpaint_padding"),
        (
            {"init_image_base64": INIT, "mask_base64": MASK, "inpaint_padding": 300},
            "inpaint_padding",
        ),
        ({"init_image_base64": INIT, "inpaint_fill": "fill"}, "inpaint_fill"),
        ({"init_image_base64": INIT, "mask_base64": MASK, "inpaint_fill": 2}, "inpaint_fill"),
        ({"outpaint": {"right": 64}}, "outpaint"),
        ({"init_image_base64": INIT, "outpaint": {"right": 60}}, "outpaint"),
        ({"init_image_base64": INIT, "outpaint": {}}, "outpaint"),
        ({"init_image_base64": INIT, "outpaint": {"left": -8}}, "outpaint"),
        ({"init_image_base64": INIT, "outpaint": {"right": 64}, "mask_base64": MASK}, "outpaint"),
        # Past SDXL_MAX_IMAGE_SIDE, with the size given and left out (from the image).
        (
            {"init_image_base64": INIT, "width": 64, "height": 64, "outpaint": {"right": 4096}},
            "outpaint",
        ),
        ({"init_image_base64": INIT, "outpaint": {"right": 4096}}, "outpaint"),
    ],
)
def test_inpaint_fields_are_checked_before_anything_is_recorded(
    api, generations_in_process, body, field
):
    response = api.post("/txt2img", {**SMALL, **body}, format="json")
    assert_error(response, 400, field)
    assert response.json()["message"].startswith(field)
    assert not Generation.objects.exists()
    assert not any(generations_dir(0).parent.glob("*/*"))


def test_inpainting_keeps_the_image_outside_the_mask_and_records_its_settings(
    api, generations_in_process
):
    body = {
        **SMALL,
        "init_image_base64": INIT,
        "mask_base64": MASK,
        "strength": 0.9,
        "inpaint_fill": "latent_noise",
    }
    answer = api.post("/txt2img", body, format="json").json()

    image = Image.open(io.BytesIO(base64.b64decode(answer["images_base64"][0])))
    assert image.size == (64, 64)
    difference = np.abs(np.asarray(image.convert("RGB")).astype(int) - PICTURE)
    blurred = blur_mask(_mask().astype(np.float32) / 255, 4)
    assert difference[blurred == 0].max() <= 2
    assert difference[blurred > 0.99].mean() > 10
    # Recorded as it ran: the defaults of the settings left out filled in.
    settings = {"mask_blur": 4, "inpaint_area": "whole", "inpaint_padding": 32}
    assert answer["parameters"] == {
        **answer["parameters"],
        **settings,
        "inpaint_fill": "latent_noise",
    }
    generation = Generation.objects.get(pk=answer["generation_id"])
    assert generation.parameters["inpaint_fill"] == "latent_noise"
    assert "mask" not in generation.parameters
    # The mask beside the row: its grey levels as sent, a greyscale PNG.
    folder = generations_dir(generation.pk)
    with Image.open(folder / MASK_IMAGE_NAME) as kept:
        assert kept.format == "PNG" and kept.mode == "L"
        assert (np.asarray(kept) == _mask()).all()
    assert (folder / INIT_IMAGE_NAME).read_bytes() == base64.b64decode(INIT)
    text = read_infotext(base64.b64decode(answer["images_base64"][0]))
    assert "Mask blur: 4, Masked content: latent noise" in text
    assert "Inpaint area" not in text


@pytest.mark.one_pass  # rendering, not the database: the SQLite pass is enough
def test_only_masked_is_written_as_a1111_writes_it(api, generations_in_process):
    body = {
        **SMALL,
        "init_image_base64": INIT,
        "mask_base64": MASK,
        "inpaint_area": "masked",
        "inpaint_padding": 8,
        "mask_blur": 2,
    }
    answer = api.post("/txt2img", body, format="json").json()
    text = read_infotext(base64.b64decode(answer["images_base64"][0]))
    assert (
        "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8, Masked content: original"
        in text
    )


def test_outpainting_answers_the_grown_canvas(api, generations_in_process):
    body = {**SMALL, "init_image_base64": INIT, "outpaint": {"left": 16, "bottom": 32}}
    answer = api.post("/txt2img", body, format="json").json()

    image = Image.open(io.BytesIO(base64.b64decode(answer["images_base64"][0])))
    assert image.size == (64 + 16, 64 + 32)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    # The original region away from the seam (mask_blur 4 px + the blur's 10 px) is kept.
    kept = pixels[: 64 - 14, 16 + 14 : 16 + 64]
    assert np.abs(kept - PICTURE[: 64 - 14, 14:]).max() <= 2
    assert answer["parameters"]["outpaint"] == {"left": 16, "right": 0, "top": 0, "bottom": 32}
    assert (answer["parameters"]["width"], answer["parameters"]["height"]) == (64, 64)
    text = read_infotext(base64.b64decode(answer["images_base64"][0]))
    assert "Size: 80x96," in text
    assert 'Outpaint: "left 16, right 0, top 0, bottom 32"' in text
    folder = generations_dir(answer["generation_id"])
    assert not (folder / MASK_IMAGE_NAME).exists()


def test_a_failed_inpainting_keeps_no_mask(api, generations_in_process, monkeypatch):
    from sdxl_engine.errors import EngineError
    from sdxl_engine.generation import render

    def fail(*_args, **_kwargs):
        raise EngineError("out of luck")

    monkeypatch.setattr(render, "render_batch", fail)
    body = {**SMALL, "init_image_base64": INIT, "mask_base64": MASK}
    response = api.post("/txt2img", body, format="json")
    assert response.status_code == 500
    generation = Generation.objects.get()
    assert generation.status == Generation.Status.ERROR
    assert not generations_dir(generation.pk).exists()
