import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management.base import CommandError

from sdxl_engine.files import sha256_file
from sessions_app import services, storage
from sessions_app.models import ImageGroup, Session, TrainingImage
from tests.helpers import image_bytes
from tests.maintenance_helpers import flask_session_data, lora_bytes, make_old, run, snapshot
from training_app.models import LoraArtifact
from training_app.services import loras as lora_services

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)

MANAGE_PY = str(Path(settings.BASE_DIR) / "manage.py")


# --- import_sessions -----------------------------------------------------------------------


def test_import_in_place_adopts_everything_and_a_second_run_changes_nothing(data_dir):
    flask_session_data(settings.SESSION_DATA_DIR)

    output = run("import_sessions", str(settings.SESSION_DATA_DIR))

    assert "imported 2 sessions (3, 7)" in output
    assert list(Session.objects.values_list("pk", "next_group_number", "next_lora_number")) == [
        (3, 2, 3),
        (7, 2, 3),
    ]
    image = TrainingImage.objects.get(file="session_data/session_7/1/0.jpg")
    assert (image.caption, image.image_format, image.group.number) == ("a blue cup", "JPEG", 1)
    assert image.sha256 == sha256_file(storage.absolute_path(image.file))
    assert list(
        LoraArtifact.objects.filter(session_id=3).values_list("number", "filename", "source")
    ) == [(1, "lora_1.safetensors", "found"), (2, "lora_2.safetensors", "found")]
    before = snapshot(data_dir)

    again = run("import_sessions", str(data_dir))  # the data dir holding session_data/ works too

    assert "0 changes, 0 files copied" in again
    assert snapshot(data_dir) == before
    assert "the rows and files agree" in run("verify")
    # New sessions, groups and LoRAs number past what was adopted.
    assert services.session_create().pk == 8
    services.session_image_add(7, image_bytes(), "new")
    assert (storage.session_dir(7) / "2" / "0.png").is_file()
    assert lora_services.lora_upload(7, lora_bytes(seed=5), None).number == 3


def test_import_gives_adopted_sessions_to_the_owner_and_a_rerun_keeps_their_owner(data_dir):
    flask_session_data(settings.SESSION_DATA_DIR)

    run("import_sessions", str(settings.SESSION_DATA_DIR), "--owner", "team a")
    run("import_sessions", str(settings.SESSION_DATA_DIR), "--owner", "team b")

    assert list(Session.objects.values_list("pk", "owner__name")) == [(3, "team a"), (7, "team a")]


def test_import_from_elsewhere_without_copy_fails_and_creates_nothing(tmp_path, data_dir):
    source = flask_session_data(tmp_path / "old" / "session_data")
    with pytest.raises(CommandError, match="--copy"):
        run("import_sessions", str(source))
    assert not Session.objects.exists()
    assert not settings.SESSION_DATA_DIR.exists()


def test_import_with_copy_copies_and_never_overwrites_a_different_file(tmp_path, data_dir):
    source = flask_session_data(tmp_path / "old" / "session_data", session_ids=(2,))

    output = run("import_sessions", str(source), "--copy")

    assert "10 files copied" not in output and "6 files copied" in output
    for path in source.rglob("*"):
        if path.is_file():
            copied = settings.SESSION_DATA_DIR / path.relative_to(source)
            assert copied.read_bytes() == path.read_bytes()
    before = snapshot(data_dir)
    assert "0 changes, 0 files copied" in run("import_sessions", str(source), "--copy")
    assert snapshot(data_dir) == before

    (source / "session_2" / "0" / "0.txt").write_text("a caption changed at the source")
    with pytest.raises(CommandError, match="need a person"):
        run("import_sessions", str(source), "--copy")
    assert snapshot(data_dir) == before  # the existing file and its row are kept


def test_import_of_a_folder_without_sessions_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="no session_<id> folders"):
        run("import_sessions", str(tmp_path / "empty"))
    assert not Session.objects.exists()


@pytest.mark.one_pass
def test_commands_exit_non_zero_and_have_help(tmp_path):
    failed = subprocess.run(
        [sys.executable, MANAGE_PY, "import_sessions", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "no session_<id> folders" in failed.stderr
    for command in ("import_sessions", "rescan", "verify", "export_session", "purge_sessions"):
        helped = subprocess.run(
            [sys.executable, MANAGE_PY, command, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert helped.returncode == 0 and "usage:" in helped.stdout, command


# --- rescan ----------------------------------------------------------------------------------


def _session_with_two_images() -> Session:
    """Group 0: a red image with a mask; group 1: a green one without; one LoRA."""
    session = services.session_create()
    mask = image_bytes(color="white")
    services.session_image_add(session.pk, image_bytes(color="red"), "red", mask_bytes=mask)
    services.session_image_add(session.pk, image_bytes(color="green"), "green")
    lora_services.lora_upload(session.pk, lora_bytes(seed=1), None)
    session.refresh_from_db()
    return session


def test_rescan_follows_files_added_and_removed_by_hand():
    session = _session_with_two_images()
    folder = storage.session_dir(session.pk)
    storage.remove_tree(folder / "0")
    (folder / "5").mkdir()
    (folder / "5" / "shot.webp").write_bytes(image_bytes("WEBP", color="blue"))
    (folder / "5" / "shot.txt").write_text("a blue square")
    (folder / "5" / "shot_mask.png").write_bytes(image_bytes(color="white"))
    (folder / "5" / "uncaptioned.png").write_bytes(image_bytes())
    (folder / "1" / "0.txt").write_text("green, recaptioned")
    (folder / "lora_9.safetensors").write_bytes(lora_bytes(seed=9))
    (folder / "style.safetensors").write_bytes(lora_bytes(seed=10))

    output = run("rescan", "--session", str(session.pk))

    assert "rescan: " in output and "group 0 has no folder" in output
    assert list(ImageGroup.objects.values_list("number", flat=True)) == [1, 5]
    assert dict(TrainingImage.objects.values_list("file", "caption")) == {
        f"session_data/session_{session.pk}/1/0.png": "green, recaptioned",
        f"session_data/session_{session.pk}/5/shot.webp": "a blue square",
    }
    # An image found with its mask beside it gets the mask (never an image of its own).
    found = TrainingImage.objects.get(file__endswith="/5/shot.webp")
    assert found.mask_file == f"session_data/session_{session.pk}/5/shot_mask.png"
    assert found.mask_size == (folder / "5" / "shot_mask.png").stat().st_size
    assert list(LoraArtifact.objects.values_list("number", "filename")) == [
        (1, "lora_1.safetensors"),
        (9, "lora_9.safetensors"),
        (10, "style.safetensors"),
    ]
    session.refresh_from_db()
    assert (session.next_group_number, session.next_lora_number) == (6, 11)
    assert "rescan: 0 changes" in run("rescan")


def test_rescan_reports_an_unreadable_file_and_exits_1_without_touching_it():
    session = _session_with_two_images()
    broken = storage.session_dir(session.pk) / "1" / "0.png"
    broken.write_bytes(b"not an image any more")
    with pytest.raises(CommandError, match="need a person"):
        run("rescan")
    assert broken.read_bytes() == b"not an image any more"
    assert TrainingImage.objects.filter(file__endswith="/1/0.png").exists()


def test_rescan_of_an_unknown_session_fails():
    with pytest.raises(CommandError, match="not found"):
        run("rescan", "--session", "404")


# --- verify --------------------------------------------------------------------------------


def test_verify_passes_on_what_the_service_wrote():
    _session_with_two_images()
    output = run("verify")
    assert (
        "1 sessions, 2 images, 1 masks, 1 LoRA files, 0 checkpoints, 0 sample images checked"
        in output
    )
    assert "the rows and files agree" in output


def test_verify_reports_masks_missing_unrecorded_lone_or_broken_and_fix_follows_the_disk():
    session = _session_with_two_images()
    folder = storage.session_dir(session.pk)
    (folder / "0" / "0_mask.png").unlink()  # a row naming a missing mask: fixable
    (folder / "1" / "0_mask.png").write_bytes(image_bytes(color="white"))  # unrecorded: fixable
    (folder / "1" / "7_mask.png").write_bytes(image_bytes(color="white"))  # no image: a note

    with pytest.raises(CommandError, match="2 inconsistencies"):
        run("verify")
    output = run("verify", "--fix")

    red, green = TrainingImage.objects.order_by("group__number")
    assert (red.mask_file, red.mask_size) == ("", 0)
    assert green.mask_file == f"session_data/session_{session.pk}/1/0_mask.png"
    assert green.mask_size == (folder / "1" / "0_mask.png").stat().st_size
    assert "1/7_mask.png: a mask beside no captioned image" in output
    assert "2 images, 1 masks" in output and (folder / "1" / "7_mask.png").exists()

    (folder / "1" / "0_mask.png").write_bytes(b"no image at all")  # needs a person
    with pytest.raises(CommandError, match="1 inconsistencies"):
        run("verify", "--fix")
    assert (folder / "1" / "0_mask.png").read_bytes() == b"no image at all"
    assert TrainingImage.objects.get(pk=green.pk).mask_file == green.mask_file


def test_verify_reports_mismatches_and_fix_repairs_what_loses_no_data(data_dir):
    session = _session_with_two_images()
    folder = storage.session_dir(session.pk)
    (folder / "0" / "0.txt").write_text("edited by hand")  # row differs: fixable
    (folder / "lora_1.safetensors").unlink()  # row without file: fixable
    (folder / "lora_7.safetensors").write_bytes(lora_bytes(seed=7))  # file without row: fixable
    stale = folder / "1" / ".0.png.0123.tmp"
    stale.write_bytes(b"half written")
    make_old(stale)  # a leftover of a write interrupted long ago: fixable
    fresh = folder / "1" / ".0.txt.4567.tmp"
    fresh.write_bytes(b"being written right now")  # may be in use: left alone
    personal = folder / ".notes"
    personal.write_text("an operator's hidden file")
    make_old(personal)  # hidden, but no leftover of ours: left alone
    corrupt = folder / "1" / "0.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # does not decode: needs a person

    with pytest.raises(CommandError, match="inconsistencies; `verify --fix`"):
        run("verify")
    before_fix = snapshot(data_dir)
    with pytest.raises(CommandError) as failure:
        run("verify", "--fix")

    assert "1 inconsistencies" in str(failure.value)  # only the image that does not decode
    assert TrainingImage.objects.get(file__endswith="/0/0.png").caption == "edited by hand"
    assert list(LoraArtifact.objects.values_list("filename", flat=True)) == ["lora_7.safetensors"]
    assert not stale.exists() and fresh.exists() and personal.exists()
    # Nothing but the stale leftover was removed; the corrupt image and its row stay.
    files_after = snapshot(data_dir)[-1]
    assert set(before_fix[-1]) - set(files_after) == {stale.relative_to(data_dir).as_posix()}
    assert TrainingImage.objects.filter(file__endswith="/1/0.png").exists()

    corrupt.write_bytes(image_bytes(color="green"))  # a person restores the image
    output = run("verify", "--fix")
    assert "the rows and files agree" in output


def test_verify_fix_removes_uploads_left_in_staging_by_a_killed_process(data_dir):
    _session_with_two_images()
    killed = storage.staging_path("upload.safetensors")
    killed.write_bytes(b"an upload whose process was killed while checking it")
    make_old(killed)
    in_progress = storage.staging_path("upload.safetensors")
    in_progress.write_bytes(b"an upload being checked right now")

    with pytest.raises(CommandError, match="inconsistencies"):
        run("verify")
    assert killed.exists()
    run("verify", "--fix")

    assert not killed.exists() and in_progress.exists()


def test_verify_adopts_a_session_folder_without_a_row(data_dir):
    flask_session_data(settings.SESSION_DATA_DIR, session_ids=(12,))
    with pytest.raises(CommandError):
        run("verify")
    assert "the rows and files agree" in run("verify", "--fix")
    assert Session.objects.get().pk == 12
    assert TrainingImage.objects.count() == 2 and LoraArtifact.objects.count() == 2


# --- prune_loras and purge_sessions ----------------------------------------------------------


def test_prune_loras_keeps_the_newest_and_numbers_are_never_reused():
    session = services.session_create()
    for seed in range(4):
        lora_services.lora_upload(session.pk, lora_bytes(seed=seed), None)
    folder = storage.session_dir(session.pk)

    dry = run("prune_loras", "--keep", "2", "--dry-run")

    assert f"would delete session_{session.pk}/lora_1.safetensors" in dry
    assert "would delete 2 LoRA files" in dry
    assert LoraArtifact.objects.count() == 4 and (folder / "lora_1.safetensors").exists()

    run("prune_loras", "--keep", "2")

    assert list(LoraArtifact.objects.values_list("number", flat=True)) == [3, 4]
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "lora_3.safetensors",
        "lora_4.safetensors",
    ]
    assert lora_services.lora_upload(session.pk, lora_bytes(seed=9), None).number == 5
    with pytest.raises(CommandError, match="--keep"):
        run("prune_loras", "--keep", "-1")


def test_purge_sessions_deletes_only_sessions_idle_for_long_enough():
    from django.utils import timezone

    from training_app.models import TrainingRun

    old, fresh, training = (_session_with_two_images() for _ in range(3))
    long_ago = timezone.now() - timezone.timedelta(days=40)
    for session in (old, training):
        Session.objects.filter(pk=session.pk).update(created_at=long_ago)
        ImageGroup.objects.filter(session=session).update(created_at=long_ago)
        LoraArtifact.objects.filter(session=session).update(created_at=long_ago)
    TrainingRun.objects.create(session=training, status="running")
    TrainingRun.objects.filter(session=training).update(created_at=long_ago)

    dry = run("purge_sessions", "--older-than", "30", "--dry-run")

    assert f"would delete session {old.pk} " in dry and "would delete 1 sessions" in dry
    assert Session.objects.count() == 3

    run("purge_sessions", "--older-than", "30")

    assert sorted(Session.objects.values_list("pk", flat=True)) == [fresh.pk, training.pk]
    assert not storage.session_dir(old.pk).exists()
    assert storage.session_dir(fresh.pk).is_dir()
