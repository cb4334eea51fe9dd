import io

import pytest
from django.db import transaction
from PIL import Image

from access_app.selectors import owner_stored_bytes
from core.errors import ServiceError
from sessions_app import services, storage
from sessions_app.models import ImageGroup, Session, TrainingImage
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


def test_session_create_makes_row_and_folder():
    session = services.session_create()
    assert Session.objects.filter(pk=session.pk).exists()
    assert storage.session_dir(session.pk).is_dir()


def test_image_add_writes_group_folder_and_rows():
    session = services.session_create()
    png = image_bytes("PNG", (48, 40))
    image = services.session_image_add(session.pk, png, "a red apple")
    group_dir = storage.session_dir(session.pk) / "0"
    assert (group_dir / "0.png").read_bytes() == png
    assert (group_dir / "0.txt").read_text(encoding="utf-8") == "a red apple"
    assert image.file == f"session_data/session_{session.pk}/0/0.png"
    assert (image.width, image.height, image.image_format) == (48, 40, "PNG")
    assert image.sha256 == storage.sha256_bytes(png)
    assert image.size == len(png)


def test_image_add_keeps_format_and_numbers_groups_in_order():
    session = services.session_create()
    jpeg = image_bytes("JPEG")
    services.session_image_add(session.pk, image_bytes("PNG"), "one")
    services.session_image_add(session.pk, jpeg, "two")
    services.session_image_add(session.pk, image_bytes("WEBP"), "three")
    folder = storage.session_dir(session.pk)
    assert (folder / "1" / "0.jpg").read_bytes() == jpeg
    assert (folder / "2" / "0.webp").exists()
    assert list(ImageGroup.objects.filter(session=session).values_list("number", flat=True)) == [
        0,
        1,
        2,
    ]
    session.refresh_from_db()
    assert session.next_group_number == 3


def test_image_add_skips_group_numbers_dropped_in_by_hand():
    session = services.session_create()
    (storage.session_dir(session.pk) / "4").mkdir()
    services.session_image_add(session.pk, image_bytes(), "after the hand-made folder")
    assert (storage.session_dir(session.pk) / "5" / "0.png").exists()


@pytest.mark.parametrize(
    "payload",
    [b"not an image at all", b"GIF89a" + b"\x00" * 20, image_bytes("PNG")[:40]],
    ids=["random bytes", "gif header", "truncated png"],
)
def test_image_add_rejects_undecodable_images_and_writes_nothing(payload):
    session = services.session_create()
    with pytest.raises(ServiceError) as error:
        services.session_image_add(session.pk, payload, "caption")
    assert error.value.status == 400
    assert list(storage.session_dir(session.pk).iterdir()) == []
    assert not ImageGroup.objects.exists() and not TrainingImage.objects.exists()
    session.refresh_from_db()
    assert session.next_group_number == 0


@pytest.mark.parametrize("image_format", ["GIF", "TIFF", "ICO", "PPM", "TGA"])
def test_image_add_refuses_formats_outside_the_list(image_format):
    session = services.session_create()
    # Pillow decodes these; only the four accepted formats' parsers may see the bytes.
    with pytest.raises(ServiceError, match="does not hold a PNG, JPEG, WebP or BMP image"):
        services.session_image_add(session.pk, image_bytes(image_format), "caption")
    assert list(storage.session_dir(session.pk).iterdir()) == []


def test_image_add_to_unknown_session_is_404_and_writes_nothing(data_dir):
    with pytest.raises(ServiceError) as error:
        services.session_image_add(999, image_bytes(), "caption")
    assert error.value.status == 404
    assert not (data_dir / "session_data" / "session_999").exists()


def test_session_delete_removes_folder_and_rows(django_capture_on_commit_callbacks):
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "caption")
    folder = storage.session_dir(session.pk)
    with django_capture_on_commit_callbacks(execute=True):
        services.session_delete(session.pk)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []  # the renamed copy is gone too
    assert not Session.objects.exists() and not TrainingImage.objects.exists()


def test_session_delete_leaves_nothing_of_its_runs(django_capture_on_commit_callbacks):
    from tests.maintenance_helpers import stored_checkpoint, stored_samples
    from training_app.models import TrainingCheckpoint, TrainingRun, TrainingSample
    from training_app.services.watch import resume_state_dir

    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "caption")
    ended = TrainingRun.objects.create(session=session, status="completed")
    stored_checkpoint(ended, 2)
    stored_samples(ended, 2, prompts=("a", "b"))
    (resume_state_dir(session.pk, ended.pk)).mkdir()
    (resume_state_dir(session.pk, ended.pk) / "resume.pt").write_bytes(b"state")
    folder = storage.session_dir(session.pk)
    assert (folder / "checkpoints").is_dir() and (folder / "samples").is_dir()

    with django_capture_on_commit_callbacks(execute=True):
        services.session_delete(session.pk)

    # The folder went whole (its checkpoints/, samples/ and resume state), renamed copy too.
    assert [path.name for path in folder.parent.iterdir()] == [".staging"]
    assert not any(folder.parent.joinpath(".staging").iterdir())
    assert not TrainingRun.objects.exists()
    assert not TrainingCheckpoint.objects.exists() and not TrainingSample.objects.exists()


def test_session_delete_unknown_is_404():
    with pytest.raises(ServiceError) as error:
        services.session_delete(12345)
    assert error.value.status == 404


def _uncaptioned_session(count: int) -> tuple[Session, list[TrainingImage]]:
    session = services.session_create()
    images = [services.session_image_add(session.pk, image_bytes(), "") for _ in range(count)]
    return session, images


def test_captions_leave_a_caption_written_while_the_model_ran(monkeypatch):
    # The model runs outside the session lock: a caption fixed in the meantime (a PATCH)
    # is kept, and an image deleted in the meantime is left out.
    session, (kept, fixed, deleted) = _uncaptioned_session(3)

    def model_meanwhile(paths, prefix=""):
        services.training_image_caption_set(session.pk, fixed.pk, "typed by hand")
        services.training_image_delete(session.pk, deleted.pk)
        return [f"{prefix} generated {n}" for n in range(len(paths))]

    monkeypatch.setattr(services, "captions_generate", model_meanwhile)

    written = services.session_captions_create(session.pk, prefix="TOK,")

    assert written == {
        "captioned": 1,
        "skipped": 1,
        "images": [
            {"image_id": kept.pk, "caption": "TOK, generated 0", "written": True},
            {"image_id": fixed.pk, "caption": "typed by hand", "written": False},
        ],
    }
    folder = storage.session_dir(session.pk)
    assert (folder / "0" / "0.txt").read_text() == "TOK, generated 0"
    assert (folder / "1" / "0.txt").read_text() == "typed by hand"


def test_captions_that_fail_writing_leave_every_caption_file_and_row_as_it_was(monkeypatch):
    session, images = _uncaptioned_session(3)
    monkeypatch.setattr(
        services, "captions_generate", lambda paths, prefix="": ["a cat"] * len(paths)
    )
    real_write = storage.atomic_write_bytes
    writes = []

    def full_on_the_third(path, data):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", full_on_the_third)

    with pytest.raises(OSError):
        services.session_captions_create(session.pk)

    folder = storage.session_dir(session.pk)
    assert [(folder / str(n) / "0.txt").read_text() for n in range(3)] == ["", "", ""]
    assert [image.caption for image in TrainingImage.objects.order_by("pk")] == ["", "", ""]


# --- masks ----------------------------------------------------------------------------------


def _image_with_mask(mask_color="white"):
    session = services.session_create()
    mask = image_bytes(color=mask_color, size=(24, 20))
    image = services.session_image_add(session.pk, image_bytes(), "ohwx", mask_bytes=mask)
    return session, image


def _mask_state(image) -> tuple:
    image.refresh_from_db()
    path = storage.absolute_path(image.file).with_name("0_mask.png")
    return image.mask_file, image.mask_size, path.read_bytes() if path.exists() else None


def test_an_image_added_with_a_mask_has_it_beside_it_as_a_greyscale_png_of_its_size():
    session, image = _image_with_mask()
    path = storage.session_dir(session.pk) / "0" / "0_mask.png"
    assert image.mask_file == f"session_data/session_{session.pk}/0/0_mask.png"
    assert image.mask_size == path.stat().st_size
    with Image.open(path) as stored:
        assert (stored.format, stored.mode, stored.size) == ("PNG", "L", (48, 40))
        assert stored.getextrema() == (255, 255)


def test_mask_store_replaces_the_mask_and_records_it():
    session, image = _image_with_mask()
    mask = Image.new("L", (96, 80), 0)
    mask.paste(200, (0, 0, 48, 80))

    stored = services.training_image_mask_store(session.pk, image.pk, mask)

    mask_file, mask_size, data = _mask_state(image)
    assert (
        (stored.mask_file, stored.mask_size)
        == (mask_file, mask_size)
        == (
            image.mask_file,
            len(data),
        )
    )
    with Image.open(io.BytesIO(data)) as written:
        assert (written.mode, written.size) == ("L", (48, 40))
        assert written.getpixel((2, 20)) == 200 and written.getpixel((45, 20)) == 0


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (Image.new("L", (40, 48), 255), "mask: the mask is 40x48 and its image 48x40"),
        (Image.new("L", (48, 40), 0), "mask: the mask is entirely black"),
    ],
)
def test_a_mask_that_cannot_fit_its_image_is_refused_and_the_old_one_stays(mask, message):
    session, image = _image_with_mask()
    before = _mask_state(image)
    with pytest.raises(ServiceError, match=message):
        services.training_image_mask_store(session.pk, image.pk, mask)
    assert _mask_state(image) == before


@pytest.mark.parametrize("status", ["queued", "running"])
def test_masks_cannot_change_while_the_session_trains(status):
    from training_app.models import TrainingRun

    session, image = _image_with_mask()
    run = TrainingRun.objects.create(session=session, status=status, parameters={})
    before = _mask_state(image)
    for change in (
        lambda: services.training_image_mask_store(session.pk, image.pk, Image.new("L", (4, 4), 9)),
        lambda: services.training_image_mask_delete(session.pk, image.pk),
    ):
        with pytest.raises(ServiceError, match=f"is training \\(run {run.pk}\\)") as refusal:
            change()
        assert refusal.value.status == 409
        assert _mask_state(image) == before


def test_mask_delete_forgets_the_row_first_and_removes_the_file_once_committed(
    django_capture_on_commit_callbacks,
):
    session, image = _image_with_mask()
    path = storage.session_dir(session.pk) / "0" / "0_mask.png"
    # A delete whose transaction fails leaves row and file as they were.
    with pytest.raises(RuntimeError), transaction.atomic():
        services.training_image_mask_delete(session.pk, image.pk)
        raise RuntimeError("the commit fails")
    assert _mask_state(image)[0] and path.exists()

    with django_capture_on_commit_callbacks(execute=True):
        services.training_image_mask_delete(session.pk, image.pk)

    assert _mask_state(image) == ("", 0, None)
    with pytest.raises(ServiceError, match=f"image {image.pk} has no mask") as refusal:
        services.training_image_mask_delete(session.pk, image.pk)
    assert refusal.value.status == 404


def test_deleting_an_image_removes_its_mask_and_its_emptied_group(
    django_capture_on_commit_callbacks,
):
    session, image = _image_with_mask()
    with django_capture_on_commit_callbacks(execute=True):
        services.training_image_delete(session.pk, image.pk)
    assert list(storage.session_dir(session.pk).iterdir()) == []


def test_an_owners_stored_bytes_count_the_masks():
    session, image = _image_with_mask()
    assert owner_stored_bytes(session.owner_id) == image.size + image.mask_size
    assert image.mask_size > 0


def _photo_stored_on_its_side() -> bytes:
    """A 48x32 JPEG whose EXIF orientation (6) shows it as a 32x48 portrait, as a phone held
    upright writes its photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = io.BytesIO()
    Image.new("RGB", (48, 32), "red").save(stored, format="JPEG", exif=exif)
    return stored.getvalue()


def test_a_mask_lies_over_a_photo_as_it_is_seen_upright_by_its_exif_orientation():
    session = services.session_create()
    portrait_mask = image_bytes(color="white", size=(32, 48))

    image = services.session_image_add(
        session.pk, _photo_stored_on_its_side(), "ohwx", mask_bytes=portrait_mask
    )

    assert (image.width, image.height) == (48, 32)  # the file's pixels, as stored
    with Image.open(storage.absolute_path(image.mask_file)) as mask:
        assert mask.size == (32, 48)  # over the photo as shown, and as training turns it
    services.training_image_mask_store(
        session.pk, image.pk, Image.new("L", (64, 96), 255), field="mask_base64"
    )
    with Image.open(storage.absolute_path(image.mask_file)) as mask:
        assert mask.size == (32, 48)
    with pytest.raises(ServiceError, match="aspect ratio"):
        services.training_image_mask_store(session.pk, image.pk, Image.new("L", (48, 32), 255))
