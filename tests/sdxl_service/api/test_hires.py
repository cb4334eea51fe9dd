"""/txt2img's `hires` (AUTOMATIC1111's hires fix): validated (400 naming it, nothing
recorded), recorded in the row and the answer, its images at the scaled size with the
infotext A1111 writes."""

import base64
import io
import json

import pytest
from PIL import Image

from sdxl_engine.image_output import read_infotext
from tests.helpers import b64, image_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation

pytestmark = pytest.mark.django_db

SMALL = {"prompt": "a red cube", "height": 64, "width": 64, "steps": 5, "seed": 3}


@pytest.mark.parametrize(
    ("hires", "message"),
    [
        ({"scale": 1.0}, "hires: scale must be above 1 and at most 4"),
        ({"scale": 4.5}, "hires.scale: "),
        ({"scale": True}, "hires.scale: "),
        ({"upscaler": "esrgan"}, "hires.upscaler: "),
        ({"steps": -1}, "hires.steps: "),
        ({"steps": 151}, "hires.steps: "),
        ({"steps": 2.5}, "hires.steps: "),
        ({"denoising_strength": 0}, "hires: denoising_strength must be above 0 and at most 1"),
        ({"denoising_strength": 1.5}, "hires.denoising_strength: "),
        (
            {"steps": 1, "denoising_strength": 0.5},
            "hires: its steps x denoising_strength is under 1",
        ),
        ({"hr_scale": 2}, "hires.hr_scale: unknown field"),
        ("yes", "hires"),
    ],
)
def test_a_bad_hires_is_400_naming_it_and_records_nothing(api, generation_worker, hires, message):
    response = api.post("/txt2img", {**SMALL, "hires": hires}, format="json")

    assert_error(response, 400, "hires")
    assert response.json()["message"].startswith(message)
    assert not Generation.objects.exists()


def test_hires_is_text_to_image_only(api, generation_worker):
    body = {**SMALL, "hires": {}, "init_image_base64": b64(image_bytes("PNG", (64, 64), "red"))}
    response = api.post("/txt2img", body, format="json")

    assert_error(response, 400, "hires: applies only to text-to-image")
    assert not Generation.objects.exists()


@pytest.mark.parametrize(
    ("size", "scale"), [({"width": 64, "height": 96}, 1.5), ({}, 2.0), ({"width": 80}, 1.6)]
)
def test_a_hires_size_past_the_limit_is_400_naming_it(
    api, generation_worker, settings, size, scale
):
    settings.SDXL_MAX_IMAGE_SIDE = 120
    body = {"prompt": "x", "steps": 5, **size, "hires": {"scale": scale}}
    response = api.post("/txt2img", body, format="json")

    assert_error(response, 400, "hires: makes ")
    assert "larger than SDXL_MAX_IMAGE_SIDE (120)" in response.json()["message"]
    assert not Generation.objects.exists()
    # Within the limit: int(80 x 1.45) = 116, its latents 14 wide: 112 (A1111's rounding).
    body = {"prompt": "x", "steps": 5, "width": 80, "hires": {"scale": 1.45}}
    assert api.post("/txt2img", {**body, "async": True}, format="json").status_code == 202
    assert Generation.objects.get().parameters["hires"]["scale"] == 1.45


def test_hires_takes_a1111s_names_and_records_every_field(api, generation_worker):
    body = {**SMALL, "async": True, "hires": {"upscaler": "Lanczos", "steps": 0, "scale": 1.5}}
    response = api.post("/txt2img", body, format="json")

    assert response.status_code == 202, response.content
    assert Generation.objects.get().parameters["hires"] == {
        "scale": 1.5,
        "upscaler": "lanczos",
        "steps": None,  # A1111's 0: the request's steps
        "denoising_strength": 0.7,
    }


@pytest.mark.one_pass  # rendering, not the database: the SQLite pass is enough
def test_txt2img_with_hires_answers_the_scaled_images_and_a1111s_infotext(
    api, generations_in_process
):
    hires = {"scale": 2, "upscaler": "latent", "steps": 6, "denoising_strength": 0.5}
    body = {**SMALL, "num_images": 2, "hires": hires}
    answer = api.post("/txt2img", body, format="json").json()

    images = [base64.b64decode(image) for image in answer["images_base64"]]
    assert [Image.open(io.BytesIO(image)).size for image in images] == [(128, 128)] * 2
    assert answer["parameters"]["hires"] == hires
    # The row's size is the first pass's, as A1111's Size.
    assert (answer["parameters"]["width"], answer["parameters"]["height"]) == (64, 64)
    text = read_infotext(images[1])
    assert text.startswith("a red cube\nSteps: 5, CFG scale: 7, Seed: 4, Size: 64x64, Model: ")
    assert ", Denoising strength: 0.5, Hires upscale: 2, Hires steps: 6, " in text
    assert "Hires upscaler: Latent, Refiner: " in text
    record = json.loads(Image.open(io.BytesIO(images[0])).text["sdxl_service"])
    assert record["hires"] == hires
    generation = Generation.objects.get()
    # 5 first-pass steps, then half of the 6-step schedule.
    assert (generation.step, generation.total_steps) == (8, 8)
    assert api.get(f"/generations/{generation.pk}").json()["parameters"]["hires"] == hires
    # Without hires the same request gives the first pass, which the hires images rework.
    plain = api.post("/txt2img", {**SMALL, "num_images": 2}, format="json").json()
    first = Image.open(io.BytesIO(base64.b64decode(plain["images_base64"][1])))
    assert first.size == (64, 64)
    assert "Hires" not in read_infotext(base64.b64decode(plain["images_base64"][1]))
