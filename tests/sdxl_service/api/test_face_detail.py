"""/txt2img's face_detail (issue 28): validated, recorded, answered with faces_redone, and
on the tiny model (whose images are noise, without faces) an image left exactly as the
same request without it makes it."""

import base64
import io

import numpy as np
import pytest
from django.conf import settings
from PIL import Image

from sdxl_engine.image_output import read_infotext
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation
from training_app.services.generations import batches

pytestmark = pytest.mark.django_db

SMALL = {"prompt": "a portrait", "height": 64, "width": 64, "steps": 5, "seed": 5}


def pixels(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def test_face_detail_is_recorded_answered_and_leaves_a_faceless_image_alone(
    api, generations_in_process
):
    plain = api.post("/txt2img", {**SMALL, "num_images": 2}, format="json")
    asked = {"strength": 0.5, "max_faces": 2}
    detailed = api.post("/txt2img", {**SMALL, "num_images": 2, "face_detail": asked}, format="json")

    assert plain.status_code == detailed.status_code == 200, detailed.content
    body = detailed.json()
    recorded = {"strength": 0.5, "prompt": "", "padding": 32, "max_faces": 2}
    assert body["parameters"]["face_detail"] == recorded
    assert body["faces_redone"] == [0, 0] and plain.json()["faces_redone"] is None
    assert "face_detail" not in plain.json()["parameters"]
    row = Generation.objects.get(pk=body["generation_id"])
    assert row.faces_redone == [0, 0] and row.parameters["face_detail"] == recorded
    status = api.get(f"/generations/{row.pk}").json()
    assert status["faces_redone"] == [0, 0]
    assert status["parameters"]["face_detail"] == recorded
    # No face in noise: the images are the plain request's, pixel for pixel.
    images = zip(body["images_base64"], plain.json()["images_base64"], strict=True)
    for with_faces, without in images:
        assert np.array_equal(pixels(with_faces), pixels(without))
    text = read_infotext(base64.b64decode(body["images_base64"][0]))
    assert "ADetailer denoising strength: 0.5, " in text
    assert "ADetailer mask only top k: 2, " in text
    assert "ADetailer" not in read_infotext(base64.b64decode(plain.json()["images_base64"][0]))


def test_face_detail_batches_only_with_equal_settings(api, generation_worker):
    bodies = [
        {**SMALL, "async": True},
        {**SMALL, "async": True, "face_detail": {}},
        {**SMALL, "async": True, "face_detail": {"strength": 0.4}},
        {**SMALL, "async": True, "face_detail": {"strength": 0.6}},
    ]
    ids = [api.post("/txt2img", body, format="json").json()["generation_id"] for body in bodies]
    first, default, same_as_default, other = Generation.objects.order_by("pk")
    key = default.params.batch_key()
    assert same_as_default.params.batch_key() == key
    assert first.params.batch_key() != key and other.params.batch_key() != key

    batches.generation_execute(ids[1])

    ran = dict(Generation.objects.values_list("pk", "status"))
    assert [ran[pk] for pk in ids] == ["queued", "completed", "completed", "queued"]
    assert Generation.objects.get(pk=ids[2]).faces_redone == [0]


@pytest.mark.parametrize(
    ("face_detail", "fragment"),
    [
        ({"strength": 0}, "face_detail: strength must be greater than 0"),
        ({"strength": 1.5}, "face_detail"),
        ({"strength": True}, "face_detail"),
        ({"padding": -1}, "face_detail"),
        ({"padding": 257}, "face_detail"),
        ({"max_faces": 0}, "face_detail"),
        ({"max_faces": 17}, "face_detail"),
        ({"denoising_strength": 0.4}, "face_detail"),
        ({"prompt": "x" * (settings.SDXL_MAX_PROMPT_CHARS + 1)}, "face_detail"),
        ("yes", "face_detail"),
    ],
)
def test_a_bad_face_detail_is_a_400_naming_it_and_records_nothing(
    api, generation_worker, face_detail, fragment
):
    response = api.post("/txt2img", {**SMALL, "face_detail": face_detail}, format="json")
    assert_error(response, 400, fragment)
    assert not Generation.objects.exists()


def test_a_face_found_is_redone_counted_and_its_steps_are_the_jobs(
    api, generations_in_process, monkeypatch
):
    # The tiny model draws no faces: one is said to be found in the middle of each image.
    from sdxl_engine.generation import faces

    monkeypatch.setattr(faces, "find_faces", lambda image, max_faces: [(24, 24, 40, 40)])
    plain = api.post("/txt2img", SMALL, format="json").json()
    body = api.post(
        "/txt2img", {**SMALL, "face_detail": {"strength": 0.6, "padding": 0}}, format="json"
    ).json()

    assert body["faces_redone"] == [1]
    before, after = pixels(plain["images_base64"][0]), pixels(body["images_base64"][0])
    # The face's box grown 4 px and feathered 10 px more; nothing changes outside that.
    assert np.array_equal(before[:10], after[:10]) and np.array_equal(before[:, 55:], after[:, 55:])
    assert np.abs(before[24:40, 24:40].astype(int) - after[24:40, 24:40]).mean() > 10
    row = Generation.objects.get(pk=body["generation_id"])
    # 5 steps of the first pass, then int(5 x 0.6) = 3 of the face's.
    assert (row.step, row.total_steps, row.faces_redone) == (8, 8, [1])


@pytest.mark.one_pass  # rendering, not the database: the SQLite pass is enough
def test_the_face_in_a_real_photo_is_found_and_redone(api, generations_in_process):
    """scikit-image's astronaut (a real photo) inpainted in a corner far from her face, so
    the face survives the tiny model: the real detector finds it and the pass redoes it,
    and nothing changes away from the face and the corner."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (208, 208, 256, 256))  # the bottom-right corner
    body = {
        "prompt": "a portrait",
        "width": 256,
        "height": 256,
        "steps": 5,
        "seed": 3,
        "init_image_base64": _base64(photo),
        "mask_base64": _base64(mask),
        "mask_blur": 0,
        "strength": 0.6,
    }
    plain = api.post("/txt2img", body, format="json").json()
    detailed = api.post(
        "/txt2img", {**body, "face_detail": {"strength": 0.6, "padding": 8}}, format="json"
    ).json()

    assert detailed["faces_redone"] == [1]
    before = pixels(plain["images_base64"][0]).astype(int)
    after = pixels(detailed["images_base64"][0]).astype(int)
    # The face (the detector's box in the 512 px photo is about x 177-270, y 67-160).
    assert np.abs(after[40:75, 92:130] - before[40:75, 92:130]).mean() > 10
    # The photo's left and bottom-left, far from the face and the corner: untouched by both.
    original = np.asarray(photo).astype(int)
    for image in (before, after):
        assert np.abs(image[120:200, :60] - original[120:200, :60]).max() <= 2


def _base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
