"""POST /sessions/<id>/masks: masks made for a session's images, stored beside them."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import Session, TrainingImage
from tests.sdxl_service.api.test_session_views import assert_error

pytestmark = pytest.mark.django_db


def _png(pixels: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(pixels).resize((256, 256)).save(encoded, format="PNG")
    return encoded.getvalue()


@pytest.fixture
def photos() -> tuple[int, TrainingImage, TrainingImage]:
    """A session with the astronaut's portrait and a brick wall."""
    session = session_services.session_create()
    astronaut = session_services.session_image_add(session.pk, _png(data.astronaut()), "ohwx")
    brick = session_services.session_image_add(session.pk, _png(data.brick()), "a wall")
    return session.pk, astronaut, brick


def _mask_bytes(image_id: int) -> bytes | None:
    image = TrainingImage.objects.get(pk=image_id)
    return storage.absolute_path(image.mask_file).read_bytes() if image.mask_file else None


def test_face_masks_are_stored_for_the_photo_with_a_face_and_not_for_the_texture(api, photos):
    session_id, astronaut, brick = photos

    response = api.post(f"/sessions/{session_id}/masks", {"kind": "face"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {
        "kind": "face",
        "prompt": None,
        "images": [
            {
                "image_id": astronaut.pk,
                "found": True,
                "faces": 1,
                "mask_url": f"/sessions/{session_id}/images/{astronaut.pk}/mask",
            },
            {"image_id": brick.pk, "found": False, "faces": 0, "mask_url": None},
        ],
        "masked": 1,
        "skipped": 0,
    }
    image_path = storage.absolute_path(astronaut.file)
    assert TrainingImage.objects.get(pk=astronaut.pk).mask_file == storage.relative_path(
        image_path.with_name(f"{image_path.stem}_mask.png")
    )
    with Image.open(image_path.with_name(f"{image_path.stem}_mask.png")) as mask:
        assert (mask.mode, mask.size) == ("L", (256, 256))
        assert mask.getpixel((111, 56)) == 255  # her face's centre (223, 113) at half size
        assert mask.getpixel((0, 0)) == 0
    assert TrainingImage.objects.get(pk=brick.pk).mask_file == ""
    brick_folder = storage.absolute_path(brick.file).parent
    assert sorted(path.name for path in brick_folder.iterdir()) == ["0.png", "0.txt"]


def test_images_with_a_mask_keep_it_unless_overwrite(api, photos):
    session_id, astronaut, brick = photos
    session_services.training_image_mask_store(
        session_id, astronaut.pk, Image.new("L", (256, 256), 255)
    )
    given = _mask_bytes(astronaut.pk)

    kept = api.post(
        f"/sessions/{session_id}/masks", {"kind": "face", "overwrite": False}, format="json"
    )

    assert kept.status_code == 200, kept.content
    assert [item["image_id"] for item in kept.json()["images"]] == [brick.pk]
    assert (kept.json()["masked"], kept.json()["skipped"]) == (0, 1)
    assert _mask_bytes(astronaut.pk) == given

    replaced = api.post(
        f"/sessions/{session_id}/masks", {"kind": "face", "overwrite": True}, format="json"
    )

    assert replaced.status_code == 200, replaced.content
    assert (replaced.json()["masked"], replaced.json()["skipped"]) == (1, 0)
    assert _mask_bytes(astronaut.pk) not in (None, given)


def test_subject_masks_run_the_tiny_presets_random_segmenter(api, photos):
    session_id, astronaut, brick = photos

    response = api.post(
        f"/sessions/{session_id}/masks", {"kind": "subject", "prompt": " a woman "}, format="json"
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["kind"], body["prompt"], body["skipped"]) == ("subject", "a woman", 0)
    for item in body["images"]:  # the random model's masks are noise: found or not
        assert item["faces"] is None
        stored = _mask_bytes(item["image_id"])
        assert (stored is not None) == item["found"]
        if stored is not None:
            assert Image.open(io.BytesIO(stored)).size == (256, 256)
    assert body["masked"] == sum(item["found"] for item in body["images"])


def test_subject_masks_without_a_model_are_409_naming_the_setting(api, photos, settings):
    session_id, _, _ = photos
    settings.SDXL_MODEL_PRESET = "hub"
    settings.SDXL_SUBJECT_MASK_MODEL = ""

    response = api.post(f"/sessions/{session_id}/masks", {"kind": "subject"}, format="json")

    assert_error(response, 409, "SDXL_SUBJECT_MASK_MODEL")
    assert not TrainingImage.objects.exclude(mask_file="").exists()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"kind": "hair"}, "kind"),
        ({}, "kind"),
        ({"kind": "face", "prompt": "a person"}, "prompt"),
        ({"kind": "face", "overwrite": "maybe"}, "overwrite"),
        ({"kind": "face", "colour": "red"}, "colour"),
    ],
)
def test_bad_mask_requests_are_400_naming_the_field(api, photos, body, fragment):
    session_id, _, _ = photos

    response = api.post(f"/sessions/{session_id}/masks", body, format="json")

    assert_error(response, 400, fragment)
    assert not TrainingImage.objects.exclude(mask_file="").exists()


def test_masks_are_409_while_the_session_trains(api, photos):
    from training_app.models import TrainingRun

    session_id, _, _ = photos
    run = TrainingRun.objects.create(session_id=session_id, status="running", parameters={})

    response = api.post(f"/sessions/{session_id}/masks", {"kind": "face"}, format="json")

    assert_error(response, 409, f"session {session_id} is training (run {run.pk})")
    assert not TrainingImage.objects.exclude(mask_file="").exists()


def test_another_owners_session_is_a_404_like_a_missing_one_and_keeps_its_images(photos):
    from tests.sdxl_service.api.test_tenants import tenant

    session_id, _, _ = photos
    alice, bob = tenant("alice"), tenant("bob")
    Session.objects.filter(pk=session_id).update(owner=bob.owner)

    theirs = alice.api.post(f"/sessions/{session_id}/masks", {"kind": "face"}, format="json")
    missing = alice.api.post("/sessions/987654/masks", {"kind": "face"}, format="json")

    assert_error(theirs, 404, f"session {session_id} not found")
    assert_error(missing, 404, "session 987654 not found")
    assert not TrainingImage.objects.exclude(mask_file="").exists()
    assert (
        bob.api.post(f"/sessions/{session_id}/masks", {"kind": "face"}, format="json").json()[
            "masked"
        ]
        == 1
    )
