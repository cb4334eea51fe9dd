import json
import stat
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management.base import CommandError

from datadir_app.archive import session_export
from sessions_app import services, storage
from sessions_app.models import Session, TrainingImage
from tests.helpers import image_bytes
from tests.maintenance_helpers import lora_bytes, run
from training_app.models import LoraArtifact
from training_app.services import loras as lora_services

pytestmark = pytest.mark.django_db


@pytest.fixture
def session() -> Session:
    session = services.session_create()
    mask = image_bytes(color="white", size=(24, 20))  # stored at the image's 48x40
    services.session_image_add(
        session.pk, image_bytes("PNG", color="red"), "a red apple", mask_bytes=mask
    )
    services.session_image_add(session.pk, image_bytes("JPEG", color="blue"), "ein blauer Becher")
    lora_services.lora_upload(session.pk, lora_bytes(seed=1), None)
    lora_services.lora_upload(session.pk, lora_bytes(seed=2), "style.safetensors")
    LoraArtifact.objects.filter(number=1).update(source=LoraArtifact.Source.TRAINED)
    # Training data an operator dropped in by hand travels too.
    extra = storage.session_dir(session.pk) / "manual"
    extra.mkdir()
    (extra / "x.png").write_bytes(image_bytes(color="green"))
    (extra / "x.txt").write_text("a green tile")
    session.refresh_from_db()
    return session


def _folder_files(session_id: int) -> dict[str, bytes]:
    folder = storage.session_dir(session_id)
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _rows(session_id: int) -> tuple:
    prefix = f"session_data/session_{session_id}/"
    return (
        list(
            Session.objects.filter(pk=session_id).values_list(
                "next_group_number", "next_lora_number", "created_at"
            )
        ),
        [
            (file.removeprefix(prefix), mask_file.removeprefix(prefix), *rest)
            for file, mask_file, *rest in TrainingImage.objects.filter(group__session_id=session_id)
            .order_by("file")
            .values_list(
                "file",
                "mask_file",
                "group__number",
                "caption",
                "image_format",
                "width",
                "size",
                "sha256",
                "mask_size",
            )
        ],
        list(
            LoraArtifact.objects.filter(session_id=session_id)
            .order_by("number")
            .values_list("number", "filename", "source", "size", "sha256", "metadata")
        ),
    )


def test_a_session_round_trips_exactly(session, tmp_path):
    archive = tmp_path / "session.zip"
    output = run("export_session", str(session.pk), str(archive))
    assert "2 groups, 2 images, 1 masks, 2 LoRA files" in output

    output = run("import_session", str(archive))

    copy = Session.objects.exclude(pk=session.pk).get()
    assert f"as session {copy.pk}" in output
    assert _rows(copy.pk) == _rows(session.pk)
    masked = TrainingImage.objects.get(group__session=copy, mask_file__endswith="0/0_mask.png")
    assert masked.mask_size == len(_folder_files(copy.pk)["0/0_mask.png"]) > 0
    assert _folder_files(copy.pk) == _folder_files(session.pk)
    again = session_export(copy.pk, tmp_path / "again.zip")
    first = json.loads(zipfile.ZipFile(archive).read("session.json"))
    assert {**again, "session_id": None} == {**first, "session_id": None}
    assert "the rows and files agree" in run("verify")


def test_import_gives_the_session_to_the_owner_named_by_owner_else_to_default(session, tmp_path):
    archive = tmp_path / "session.zip"
    run("export_session", str(session.pk), str(archive))

    run("import_session", str(archive), "--owner", "team a")
    run("import_session", str(archive))

    owners = Session.objects.exclude(pk=session.pk).order_by("pk").values_list("owner__name")
    assert list(owners) == [("team a",), ("default",)]


def test_export_refuses_a_session_whose_file_contradicts_its_row(session, tmp_path):
    (storage.session_dir(session.pk) / "style.safetensors").write_bytes(lora_bytes(seed=3))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CommandError, match="verify --fix"):
        run("export_session", str(session.pk), str(out / "session.zip"))
    assert list(out.iterdir()) == []
    with pytest.raises(CommandError, match="not found"):
        run("export_session", "999", str(out / "session.zip"))


def test_export_refuses_a_session_whose_mask_file_is_missing(session, tmp_path):
    (storage.session_dir(session.pk) / "0" / "0_mask.png").unlink()
    with pytest.raises(CommandError, match="0/0_mask.png is missing; run `manage.py verify"):
        run("export_session", str(session.pk), str(tmp_path / "session.zip"))
    assert not (tmp_path / "session.zip").exists()


@pytest.mark.parametrize("mask", ["1/0.jpg", "0/elsewhere_mask.png", "0/0.png"])
def test_import_refuses_a_mask_that_is_not_its_images_own(session, tmp_path, mask):
    exported = tmp_path / "session.zip"
    session_export(session.pk, exported)
    manifest = json.loads(zipfile.ZipFile(exported).read("session.json"))
    manifest["groups"][0]["images"][0]["mask"] = mask
    crafted = tmp_path / "crafted.zip"
    with zipfile.ZipFile(exported) as original, zipfile.ZipFile(crafted, "w") as copy:
        for info in original.infolist():
            if info.filename != "session.json":
                copy.writestr(info, original.read(info))
        copy.writestr("session.json", json.dumps(manifest))
    before = sorted(p.name for p in settings.SESSION_DATA_DIR.iterdir())

    with pytest.raises(CommandError, match="is not its mask among the files"):
        run("import_session", str(crafted))

    assert Session.objects.count() == 1
    assert sorted(p.name for p in settings.SESSION_DATA_DIR.iterdir()) == before


def _archive_with(
    tmp_path: Path, source: Path, extra_member: str, data: bytes = b"x", link: bool = False
) -> Path:
    """A copy of an exported archive with one more member, listed in its manifest."""
    manifest = json.loads(zipfile.ZipFile(source).read("session.json"))
    name = extra_member.removeprefix("files/")
    manifest["files"][name] = "0" * 64
    target = tmp_path / "crafted.zip"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as crafted:
        for info in original.infolist():
            if info.filename != "session.json":
                crafted.writestr(info, original.read(info))
        crafted.writestr("session.json", json.dumps(manifest))
        info = zipfile.ZipInfo(extra_member)
        if link:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        crafted.writestr(info, data)
    return target


@pytest.mark.parametrize(
    ("member", "link"),
    [
        ("files/../../escaped.txt", False),
        ("/tmp/absolute.txt", False),
        ("files//tmp/absolute.txt", False),
        ("files/..\\..\\escaped.txt", False),
        ("files/C:/escaped.txt", False),
        ("outside_files.txt", False),
        ("files/link.txt", True),
    ],
)
def test_import_refuses_unsafe_archives_and_leaves_nothing(session, tmp_path, member, link):
    exported = tmp_path / "session.zip"
    session_export(session.pk, exported)
    crafted = _archive_with(tmp_path, exported, member, b"/etc/passwd" if link else b"x", link)
    sessions_before = list(Session.objects.values_list("pk", flat=True))
    data_before = sorted(p.name for p in settings.SESSION_DATA_DIR.iterdir())

    with pytest.raises(CommandError, match="unsafe path|link"):
        run("import_session", str(crafted))

    assert list(Session.objects.values_list("pk", flat=True)) == sessions_before
    assert sorted(p.name for p in settings.SESSION_DATA_DIR.iterdir()) == data_before
    assert not list(tmp_path.rglob("escaped.txt"))


def test_import_refuses_a_file_that_does_not_match_its_sha256(session, tmp_path):
    exported = tmp_path / "session.zip"
    session_export(session.pk, exported)
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(exported) as original, zipfile.ZipFile(tampered, "w") as copy:
        for info in original.infolist():
            data = original.read(info)
            copy.writestr(info, b"tampered" if info.filename.endswith("0/0.txt") else data)
    with pytest.raises(CommandError, match="sha256"):
        run("import_session", str(tampered))
    assert Session.objects.count() == 1
    # Hidden entries (the upload staging folder) are the service's own working files.
    sessions_on_disk = [
        p.name for p in settings.SESSION_DATA_DIR.iterdir() if not p.name.startswith(".")
    ]
    assert sessions_on_disk == [f"session_{session.pk}"]


def test_import_of_something_else_fails(tmp_path):
    (tmp_path / "not.zip").write_bytes(b"plain bytes")
    with pytest.raises(CommandError, match="not a readable zip"):
        run("import_session", str(tmp_path / "not.zip"))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as other:
        other.writestr("readme.txt", "hello")
    with pytest.raises(CommandError, match="no session.json"):
        run("import_session", str(tmp_path / "other.zip"))
    assert not Session.objects.exists()
