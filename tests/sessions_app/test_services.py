import pytest

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
