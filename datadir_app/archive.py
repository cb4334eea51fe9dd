"""A session as one zip file: its images, captions, LoRA files, training runs with their
checkpoints and sample images, and what the rows say.

The archive holds `session.json` (the manifest: counters, groups, images, LoRAs, runs and
the sha256 of every file) and the session folder's files under `files/`. Importing it
makes a new session, under a new id, whose rows and files are those of the exported one;
its runs get new ids too, and their checkpoints and sample folders are named after them.

Versions: 1 (no `runs`: checkpoint and sample files travelled without their rows) is
still read; 2 adds `runs` (each with its `checkpoints` and `samples`) and, per LoRA, the
`run` that trained it. An image's `mask` (its `<k>_mask.png`, among the files) is optional
and needs no new version: an archive without masks imports without them, and a service
that predates masks imports the mask's file beside its image, where training finds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
import zipfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from access_app.services import owner_named
from core.errors import ServiceError
from datadir_app.layout import is_hidden
from sdxl_engine.dataset import mask_path_for
from sdxl_engine.files import fsync_tree, sha256_file, write_atomically
from sessions_app import storage
from sessions_app.locking import session_lock
from sessions_app.models import ImageGroup, Session, TrainingImage
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services.watch import (
    CHECKPOINTS_FOLDER,
    checkpoint_filename,
    header_score,
    run_samples_folder,
)

MANIFEST = "session.json"
FILES_PREFIX = "files/"
ARCHIVE_FORMAT = "sdxl-service-session"
ARCHIVE_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What a run that was queued or running when its session was exported says once imported:
# nothing will run it there.
UNFINISHED_MESSAGE = (
    "the run was queued or running when its session was exported; it did not finish here"
)
# The TrainingRun columns an archive carries as they are (datetimes as ISO 8601). Not the
# process's own (task_id, worker, heartbeat_at).
_RUN_FIELDS = (
    "status",
    "stage",
    "progress",
    "step",
    "total_steps",
    "last_loss",
    "parameters",
    "error_message",
    "started_at",
    "finished_at",
    "training_started_at",
    "attempts",
    "resumed_from_step",
    "webhook_url",
    "webhook_events",
)
# And the run's scores, with what an archive from before them (which lacks them) reads as.
_RUN_SCORES: dict[str, Any] = {"loss_history": [], "eval_loss": None, "similarity": None}
_RUN_TIMES = ("started_at", "finished_at", "training_started_at")
_COPY_CHUNK = 1 << 20
# session.json, as written and as read back: JSON, checked field by field on import.
Manifest = dict[str, Any]


def session_export(session_id: int, target: Path) -> Manifest:
    """Writes the session to the zip file `target` (atomically); returns the manifest.

    Runs under the session lock, so no upload or LoRA lands half-way through, and checks
    every indexed file against its row: an archive never carries a file its row
    contradicts (run `verify` first if this fails).
    """
    target = Path(target)
    with session_lock(session_id) as session:
        folder = storage.session_dir(session.pk)
        files = _session_files(folder)
        manifest = _manifest(session, folder, files)
        write_atomically(target, lambda temp: _write_zip(temp, folder, files, manifest))
    return manifest


def _session_files(folder: Path) -> dict[str, str]:
    """Every file of the session folder (leftovers of interrupted writes aside), by path."""
    if not folder.is_dir():
        return {}
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_symlink() or not path.is_file():
            continue
        if any(is_hidden(Path(part)) for part in relative.parts):
            continue
        files[relative.as_posix()] = sha256_file(path)
    return files


def _manifest(session: Session, folder: Path, files: dict[str, str]) -> Manifest:
    def in_folder(relative_to_data_dir: str) -> str:
        return storage.absolute_path(relative_to_data_dir).relative_to(folder).as_posix()

    groups = []
    for group in ImageGroup.objects.filter(session=session).prefetch_related("images"):
        images = []
        for image in group.images.all():
            name = in_folder(image.file)
            _check_against_row(files, name, image.sha256)
            entry = {
                "file": name,
                "caption": image.caption,
                "image_format": image.image_format,
                "width": image.width,
                "height": image.height,
                "size": image.size,
                "sha256": image.sha256,
            }
            if image.mask_file:
                mask = in_folder(image.mask_file)
                if mask not in files:
                    _check_against_row(files, mask, "")
                entry["mask"] = mask
            images.append(entry)
        groups.append({"number": group.number, "images": images})
    loras = []
    for artifact in LoraArtifact.objects.filter(session=session).order_by("number"):
        _check_against_row(files, artifact.filename, artifact.sha256)
        loras.append(
            {
                "filename": artifact.filename,
                "number": artifact.number,
                "source": artifact.source,
                "size": artifact.size,
                "sha256": artifact.sha256,
                "metadata": artifact.metadata,
                "run": artifact.training_run_id,
                "created_at": artifact.created_at.isoformat(),
            }
        )
    return {
        "format": ARCHIVE_FORMAT,
        "version": ARCHIVE_VERSION,
        "session_id": session.pk,
        "created_at": session.created_at.isoformat(),
        "next_group_number": session.next_group_number,
        "next_lora_number": session.next_lora_number,
        "groups": groups,
        "loras": loras,
        "runs": _runs_manifest(session, files),
        "files": files,
    }


def _runs_manifest(session: Session, files: dict[str, str]) -> list[dict[str, Any]]:
    """Each run of the session, oldest first, with its checkpoints and sample images."""
    runs = []
    for run in TrainingRun.objects.filter(session=session).order_by("pk"):
        checkpoints = []
        for checkpoint in TrainingCheckpoint.objects.filter(run=run).order_by("step"):
            name = f"{CHECKPOINTS_FOLDER}/{checkpoint.filename}"
            _check_against_row(files, name, checkpoint.sha256)
            checkpoints.append(
                {
                    "step": checkpoint.step,
                    "filename": checkpoint.filename,
                    "size": checkpoint.size,
                    "sha256": checkpoint.sha256,
                    "metadata": checkpoint.metadata,
                    "created_at": checkpoint.created_at.isoformat(),
                }
            )
        samples = []
        for sample in TrainingSample.objects.filter(run=run).order_by("step", "index"):
            name = f"{run_samples_folder(run.pk)}/{sample.filename}"
            if name not in files:
                _check_against_row(files, name, "")
            samples.append(
                {
                    "step": sample.step,
                    "index": sample.index,
                    "prompt": sample.prompt,
                    "filename": sample.filename,
                    "created_at": sample.created_at.isoformat(),
                }
            )
        row: dict[str, Any] = {
            "id": run.pk,
            "created_at": run.created_at.isoformat(),
            "init_lora": run.init_lora,
        }
        for field in (*_RUN_FIELDS, *_RUN_SCORES):
            value = getattr(run, field)
            row[field] = value.isoformat() if isinstance(value, datetime) else value
        runs.append({**row, "checkpoints": checkpoints, "samples": samples})
    return runs


def _check_against_row(files: dict[str, str], name: str, sha256: str) -> None:
    if files.get(name) != sha256:
        problem = "is missing" if name not in files else "differs from its row (sha256)"
        raise ServiceError(
            f"{name} {problem}; run `manage.py verify --fix` and export again", status=409
        )


def _write_zip(temp: Path, folder: Path, files: dict[str, str], manifest: Manifest) -> None:
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        for name in files:
            archive.write(folder / name, FILES_PREFIX + name)


# --- Import --------------------------------------------------------------------------------


def session_import(source: Path, owner: str | None = None) -> Session:
    """Makes a new session of the owner named `owner` (created if new; default: the
    default owner) from an archive written by session_export.

    Every member name is checked before anything is written (no absolute paths, no `..`,
    no links: nothing may land outside the new session folder), every file's sha256 is
    checked against the manifest, and the folder appears in one rename, with its rows, in
    one transaction: a failure leaves neither rows nor files behind.
    """
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as error:
        raise ServiceError(f"{source} is not a readable zip file ({error})") from None
    with archive:
        manifest = _read_manifest(archive)
        members = _checked_members(archive, manifest)
        root = settings.SESSION_DATA_DIR
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".importing-{uuid.uuid4().hex}"
        try:
            _extract(archive, members, manifest["files"], staging)
            return _create_session(manifest, staging, owner_named(owner).pk)
        finally:
            storage.remove_tree(staging if staging.exists() else None)


def _read_manifest(archive: zipfile.ZipFile) -> Manifest:
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except KeyError:
        raise ServiceError(
            f"the archive has no {MANIFEST}; export sessions with export_session"
        ) from None
    except (ValueError, zipfile.BadZipFile) as error:
        raise ServiceError(f"the archive's {MANIFEST} is unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ServiceError("the archive is not a session exported by export_session")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ServiceError(
            f"archive version {manifest.get('version')!r} is not supported (this service "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if manifest["version"] == 1:
        manifest["runs"] = []  # version 1 carried the runs' files but not their rows
    for key, kind in (
        ("runs", list),
        ("files", dict),
        ("groups", list),
        ("loras", list),
        ("next_group_number", int),
        ("next_lora_number", int),
    ):
        if not isinstance(manifest.get(key), kind):
            raise ServiceError(f"the archive's {MANIFEST} has no valid {key!r}")
    return manifest


def _safe_name(name: str) -> str | None:
    """`name` if it is a plain relative path that stays inside the folder, else None."""
    if (
        not storage.is_plain_relative_name(name)
        # Stricter than a zip of uploads: the manifest names files only, never "." or "".
        or any(part in ("", ".") for part in name.split("/"))
        or any(is_hidden(Path(part)) for part in PurePosixPath(name).parts)
    ):
        return None
    return name


def _checked_members(archive: zipfile.ZipFile, manifest: Manifest) -> dict[str, zipfile.ZipInfo]:
    members = {}
    for info in archive.infolist():
        if info.filename == MANIFEST or (info.is_dir() and info.filename == FILES_PREFIX):
            continue
        name = info.filename.removeprefix(FILES_PREFIX)
        if not info.filename.startswith(FILES_PREFIX) or _safe_name(name) is None:
            raise ServiceError(f"the archive holds an unsafe path: {info.filename!r}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ServiceError(f"the archive holds a link: {info.filename!r}")
        if not info.is_dir():
            members[name] = info
    listed = set(manifest["files"])
    if listed != set(members):
        different = sorted(listed ^ set(members))
        raise ServiceError(f"the archive's files do not match its manifest: {different[:3]}")
    needed = sum(info.file_size for info in members.values())
    free = shutil.disk_usage(settings.DATA_DIR).free
    if needed > free:
        raise ServiceError(f"the archive needs {needed} bytes; the data dir has {free} free")
    return members


def _extract(
    archive: zipfile.ZipFile,
    members: dict[str, zipfile.ZipInfo],
    sha256s: dict[str, str],
    staging: Path,
) -> None:
    staging.mkdir()
    inside = staging.resolve()
    for name, info in members.items():
        target = staging / name
        if not target.resolve().is_relative_to(inside):  # belt and braces
            raise ServiceError(f"the archive holds an unsafe path: {info.filename!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with archive.open(info) as packed, open(target, "xb") as unpacked:
            for chunk in iter(lambda: packed.read(_COPY_CHUNK), b""):
                digest.update(chunk)
                unpacked.write(chunk)
        if digest.hexdigest() != sha256s[name]:
            raise ServiceError(f"{name} in the archive does not match its sha256")
    fsync_tree(staging)


def _create_session(manifest: Manifest, staging: Path, owner_id: int) -> Session:
    """The rows, then the folder in one rename, in one transaction: if the rows fail, the
    staging folder is removed; if the commit fails, the folder goes back to staging."""
    target: Path | None = None
    try:
        with transaction.atomic():
            session = Session.objects.create(
                owner_id=owner_id,
                next_group_number=manifest["next_group_number"],
                next_lora_number=manifest["next_lora_number"],
            )
            if manifest.get("created_at"):
                created = datetime.fromisoformat(manifest["created_at"])
                Session.objects.filter(pk=session.pk).update(created_at=created)
            folder = storage.session_dir(session.pk)
            _create_rows(session, manifest, folder, staging)
            os.replace(staging, folder)
            target = folder
    except BaseException:
        if target is not None and target.exists() and not staging.exists():
            os.replace(target, staging)  # the finally of session_import removes it
        raise
    session.refresh_from_db()
    return session


def _create_rows(session: Session, manifest: Manifest, folder: Path, staging: Path) -> None:
    """Every row of the session; its runs' files in `staging` are renamed after their new
    runs. Rows name files where they will be once `staging` becomes `folder`."""
    try:
        for group in manifest["groups"]:
            row = ImageGroup.objects.create(session=session, number=group["number"])
            for image in group["images"]:
                _check_file(manifest, image["file"], image["sha256"])
                mask = image.get("mask")
                if mask is not None:
                    _check_mask(manifest, image["file"], mask)
                TrainingImage.objects.create(
                    group=row,
                    file=storage.relative_path(folder / image["file"]),
                    caption=image["caption"],
                    image_format=image["image_format"],
                    width=image["width"],
                    height=image["height"],
                    size=image["size"],
                    sha256=image["sha256"],
                    mask_file="" if mask is None else storage.relative_path(folder / mask),
                    mask_size=0 if mask is None else (staging / mask).stat().st_size,
                )
        runs = _create_runs(session, manifest, staging)
        for lora in manifest["loras"]:
            _check_file(manifest, lora["filename"], lora["sha256"])
            if "/" in lora["filename"]:
                raise ServiceError(f"LoRA {lora['filename']!r} is not at the session's root")
            artifact = LoraArtifact.objects.create(
                session=session,
                number=lora["number"],
                filename=lora["filename"],
                size=lora["size"],
                sha256=lora["sha256"],
                source=lora["source"],
                metadata=lora["metadata"],
                training_run=runs.get(lora.get("run")),
            )
            _keep_created_at(artifact, lora)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ServiceError(f"the archive's {MANIFEST} is incomplete ({error!r})") from None
    except IntegrityError as error:  # two rows the database holds unique, say
        raise ServiceError(f"the archive's {MANIFEST} contradicts itself ({error})") from None


def _create_runs(session: Session, manifest: Manifest, staging: Path) -> dict[int, TrainingRun]:
    """The runs' rows, by their id in the archive, with their checkpoints and samples; the
    files of each are moved (in `staging`) to the names of its new id."""
    runs: dict[int, TrainingRun] = {}
    moves: list[tuple[str, str]] = []
    renamed_checkpoints: dict[str, str] = {}
    for entry in manifest["runs"]:
        fields = {field: entry[field] for field in _RUN_FIELDS}
        fields.update({field: entry.get(field, absent) for field, absent in _RUN_SCORES.items()})
        for field in _RUN_TIMES:
            if fields[field] is not None:
                fields[field] = datetime.fromisoformat(fields[field])
        if fields["status"] not in TrainingRun.Status.values:
            raise ServiceError(f"run {entry['id']}: unknown status {fields['status']!r}")
        if fields["stage"] not in TrainingRun.Stage.values:
            raise ServiceError(f"run {entry['id']}: unknown stage {fields['stage']!r}")
        if fields["status"] in TrainingRun.ACTIVE_STATUSES:
            # Nothing will run it here (and a session holds one active run at most).
            fields.update(status=TrainingRun.Status.ERROR, error_message=UNFINISHED_MESSAGE)
        # Archives written before runs could continue a LoRA have no init_lora.
        run = TrainingRun.objects.create(
            session=session, init_lora=entry.get("init_lora"), **fields
        )
        _keep_created_at(run, entry)
        runs[entry["id"]] = run
        for checkpoint in entry["checkpoints"]:
            old = f"{CHECKPOINTS_FOLDER}/{checkpoint['filename']}"
            _check_file(manifest, old, checkpoint["sha256"])
            filename = checkpoint_filename(run.pk, checkpoint["step"])
            moves.append((old, f"{CHECKPOINTS_FOLDER}/{filename}"))
            renamed_checkpoints[checkpoint["filename"]] = filename
            stored = TrainingCheckpoint.objects.create(
                run=run,
                session=session,
                step=checkpoint["step"],
                filename=filename,
                size=checkpoint["size"],
                sha256=checkpoint["sha256"],
                metadata=checkpoint["metadata"],
                eval_loss=header_score(checkpoint["metadata"], "eval_loss"),
                similarity=header_score(checkpoint["metadata"], "similarity"),
            )
            _keep_created_at(stored, checkpoint)
        for sample in entry["samples"]:
            old = f"{run_samples_folder(entry['id'])}/{sample['filename']}"
            if "/" in sample["filename"] or old not in manifest["files"]:
                raise ServiceError(f"the manifest's sample {old} is not among its files")
            moves.append((old, f"{run_samples_folder(run.pk)}/{sample['filename']}"))
            row = TrainingSample.objects.create(
                run=run,
                step=sample["step"],
                index=sample["index"],
                prompt=sample["prompt"],
                filename=sample["filename"],
                size=(staging / old).stat().st_size,
            )
            _keep_created_at(row, sample)
    _move_files(staging, moves)
    # A run that continued a checkpoint names it as it is called here now.
    for run in runs.values():
        parent = run.init_lora
        if (
            parent
            and parent["iteration"] is None
            and parent["lora_filename"] in renamed_checkpoints
        ):
            parent["lora_filename"] = renamed_checkpoints[parent["lora_filename"]]
            run.save(update_fields=["init_lora"])
    return runs


def _move_files(staging: Path, moves: list[tuple[str, str]]) -> None:
    """Renames files in `staging`, in two passes so that one may take another's old name;
    a new name that an unmoved file holds is refused."""
    moving = [(staging / old, staging / new) for old, new in moves if old != new]
    parked = []
    for number, (old, new) in enumerate(moving):
        aside = staging / f".importing-move-{number}"
        os.replace(old, aside)
        parked.append((aside, new))
    for aside, new in parked:
        if new.exists():
            raise ServiceError(
                f"{new.relative_to(staging)} in the archive is not a file of its run"
            )
        new.parent.mkdir(parents=True, exist_ok=True)
        os.replace(aside, new)
    for emptied in {old.parent for old, _ in moving} - {staging}:
        if emptied.is_dir() and not any(emptied.iterdir()):
            emptied.rmdir()  # a run's emptied samples folder
    if moving:
        fsync_tree(staging)


def _keep_created_at(
    row: TrainingRun | LoraArtifact | TrainingCheckpoint | TrainingSample, entry: dict[str, Any]
) -> None:
    """auto_now_add ignores a given value; an update does not."""
    if entry.get("created_at"):
        created = datetime.fromisoformat(entry["created_at"])
        type(row).objects.filter(pk=row.pk).update(created_at=created)


def _check_mask(manifest: Manifest, image_file: str, mask: str) -> None:
    """An image's mask is its `<k>_mask.png` beside it, and among the archive's files."""
    if mask != mask_path_for(Path(image_file)).as_posix() or mask not in manifest["files"]:
        raise ServiceError(
            f"the manifest's mask {mask!r} of {image_file} is not its mask among the files"
        )


def _check_file(manifest: Manifest, name: str, sha256: str) -> None:
    if manifest["files"].get(name) != sha256:
        raise ServiceError(f"the manifest's row for {name} does not match the file")
