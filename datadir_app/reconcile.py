"""Keeping the index (rows) in line with the data dir (files), one session at a time.

The files are the truth. What a row says about a file is brought in line with it; a file
that should have a row gets one; a row whose file is gone goes. Nothing here deletes or
rewrites a person's file: a file that cannot be read (an image that does not decode, a
LoRA whose header is broken) is reported for a person to look at, and its row, if any,
is left as it is. The only files removed are stale leftovers of interrupted writes and
deletes (`*.tmp`, `.deleted-*`), which never held anything a reader could see, and the
resume state of a run that has ended (`.resume-run-<id>/`). What has a row is in
datadir_app.layout.

`reconcile_session` walks one session in parts: its folder, group folders, captioned
images, LoRA files, runs' checkpoints and sample images, counters, then leftovers and
training data without a row. The whole data dir (session folders without a row, leftovers
beside them) is `data_dir_report`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.color import no_style
from django.db import connection, transaction

from access_app.selectors import default_owner
from core.errors import ServiceError
from datadir_app import layout
from datadir_app.report import Change, Report
from sdxl_engine.dataset import find_training_pairs, mask_path_for
from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file
from sdxl_engine.lora_files import inspect_lora_file
from sessions_app import storage
from sessions_app.images import check_image
from sessions_app.models import ImageGroup, Session, TrainingImage
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services.watch import CHECKPOINTS_FOLDER, SAMPLES_FOLDER, sample_path


@dataclass
class _Walk:
    """One session's walk: where it looks, how deep, and what it found so far."""

    session: Session
    folder: Path
    deep: bool
    report: Report

    def change(self, text: str, apply: Callable[[], object]) -> None:
        sid = self.session.pk
        self.report.changes.append(Change(sid, f"session {sid}: {text}", apply))


def reconcile_session(session: Session, *, deep: bool) -> Report:
    """How the session's rows differ from its folder, each difference with its repair.

    `deep` also decodes every image and reads every LoRA header (verify); otherwise only
    files that are new or changed are read (rescan). Call under the session lock when the
    changes are to be applied.
    """
    walk = _Walk(session, storage.session_dir(session.pk), deep, Report())
    _reconcile_folder(walk)
    group_numbers = _reconcile_groups(walk)
    indexed_images = _reconcile_images(walk, group_numbers)
    lora_numbers = _reconcile_loras(walk)
    _reconcile_checkpoints(walk)
    _reconcile_samples(walk)
    _reconcile_counters(walk, group_numbers, lora_numbers)
    _reconcile_leftovers(walk)
    _note_unindexed_training_data(walk, indexed_images)
    return walk.report


def _reconcile_folder(walk: _Walk) -> None:
    folder = walk.folder
    if not folder.is_dir():
        walk.change(
            f"folder {storage.relative_path(folder)} is missing; creating it empty",
            lambda: folder.mkdir(parents=True, exist_ok=True),
        )


def _reconcile_groups(walk: _Walk) -> set[int]:
    """Group rows follow the numbered folders; returns the numbers on disk."""
    session = walk.session
    on_disk = layout.group_numbers_on_disk(walk.folder)
    groups = {group.number for group in ImageGroup.objects.filter(session=session)}
    for number in sorted(on_disk - groups):
        walk.change(
            f"group folder {number}/ has no row; adding it",
            partial(ImageGroup.objects.create, session=session, number=number),
        )
    for number in sorted(groups - on_disk):
        walk.change(
            f"group {number} has no folder; removing its row and its images' rows",
            ImageGroup.objects.filter(session=session, number=number).delete,
        )
    return on_disk


def _image_facts(path: Path) -> dict[str, str | int]:
    """What a TrainingImage row records about `path`; ServiceError if it does not decode."""
    data = path.read_bytes()
    checked = check_image(data)
    return {
        "image_format": checked.image_format,
        "width": checked.width,
        "height": checked.height,
        "size": len(data),
        "sha256": storage.sha256_bytes(data),
    }


def _reconcile_images(walk: _Walk, group_numbers: set[int]) -> set[str]:
    """Image rows follow the captioned images of the numbered groups; returns their
    paths (relative to the data dir)."""
    session = walk.session
    rows = {
        image.file: image
        for image in TrainingImage.objects.filter(group__session=session).select_related("group")
    }
    files = {
        storage.relative_path(path): (number, path)
        for number in sorted(group_numbers)
        for path in layout.captioned_images(walk.folder / str(number))
    }
    for relative, (number, path) in files.items():
        row = rows.get(relative)
        mask = _mask_facts(walk, path)
        if row is not None and not walk.deep and row.size == path.stat().st_size:
            if row.sha256 == sha256_file(path) and row.caption == layout.read_caption(path):
                _reconcile_mask(walk, row, mask)
                continue
        try:
            facts = _image_facts(path)
        except ServiceError as error:
            walk.report.problems.append(
                f"{relative}: cannot be used as a training image ({error.message})"
            )
            continue
        caption = layout.read_caption(path)
        if row is None:
            walk.change(
                f"{relative} has no row; adding it",
                partial(
                    _image_row_create,
                    session,
                    number,
                    file=relative,
                    caption=caption,
                    **facts,
                    **(mask or {}),
                ),
            )
            continue
        differing = [name for name, value in facts.items() if getattr(row, name) != value] + (
            ["caption"] if row.caption != caption else []
        )
        if differing:
            walk.change(
                f"{relative}: row differs from the file ({', '.join(differing)}); updating the row",
                partial(TrainingImage.objects.filter(pk=row.pk).update, caption=caption, **facts),
            )
        _reconcile_mask(walk, row, mask)
    for relative, row in rows.items():
        if relative in files:
            continue
        path = storage.absolute_path(relative)
        missing = "caption" if path.is_file() else "file"
        if row.group.number not in group_numbers:
            continue  # its group's row goes, and takes this one with it
        walk.change(
            f"{relative}: {missing} is missing; removing the row",
            TrainingImage.objects.filter(pk=row.pk).delete,
        )
    masks_of_images = {mask_path_for(path) for _, path in files.values()}
    for number in sorted(group_numbers):
        for path in layout.masks_on_disk(walk.folder / str(number)):
            if path not in masks_of_images:
                walk.report.notes.append(
                    f"{storage.relative_path(path)}: a mask beside no captioned image (no "
                    "row); left as it is"
                )
    return set(files)


def _mask_facts(walk: _Walk, image_path: Path) -> dict[str, str | int] | None:
    """What the row of the image at `image_path` records of its mask (the `<k>_mask.png`
    beside it, if any); None for a mask that does not decode (`deep`), reported."""
    mask_path = mask_path_for(image_path)
    if not mask_path.is_file():
        return {"mask_file": "", "mask_size": 0}
    relative = storage.relative_path(mask_path)
    if walk.deep:
        try:
            check_image(mask_path.read_bytes(), field=relative)
        except ServiceError as error:
            walk.report.problems.append(f"{relative}: cannot be used as a mask ({error.message})")
            return None
    return {"mask_file": relative, "mask_size": mask_path.stat().st_size}


def _reconcile_mask(walk: _Walk, row: TrainingImage, mask: dict[str, str | int] | None) -> None:
    """The row names its mask as the disk has it: a mask found beside the image is
    recorded, a recorded mask whose file is gone forgotten."""
    if mask is None or (row.mask_file, row.mask_size) == (mask["mask_file"], mask["mask_size"]):
        return
    if not mask["mask_file"]:
        text = f"{row.mask_file}: the mask of {row.file} is missing; forgetting it on the row"
    elif not row.mask_file:
        text = f"{mask['mask_file']}: the mask of {row.file} has no row; recording it"
    else:
        text = f"{mask['mask_file']}: the row differs from the mask file; updating the row"
    walk.change(text, partial(TrainingImage.objects.filter(pk=row.pk).update, **mask))


def _image_row_create(session: Session, number: int, **values: Any) -> None:
    """The row of an image of group `number`, whose row may be added by an earlier change."""
    TrainingImage.objects.create(
        group=ImageGroup.objects.get(session=session, number=number), **values
    )


def _reconcile_loras(walk: _Walk) -> set[int]:
    """LoRA rows follow the `*.safetensors` files at the session's root; returns the
    numbers they hold afterwards."""
    session = walk.session
    loras = {
        artifact.filename: artifact for artifact in LoraArtifact.objects.filter(session=session)
    }
    taken_numbers = {artifact.number for artifact in loras.values()}
    new_files = []
    on_disk = layout.lora_files_on_disk(walk.folder)
    for path in on_disk:
        row = loras.get(path.name)
        relative = storage.relative_path(path)
        if row is not None and not walk.deep and row.size == path.stat().st_size:
            if row.sha256 == sha256_file(path):
                continue
        try:
            info = inspect_lora_file(path)
        except EngineError as error:
            walk.report.problems.append(f"{relative}: not a readable LoRA file ({error})")
            continue
        if row is None:
            new_files.append((path, info))
        elif (row.size, row.sha256) != (info.size_bytes, info.sha256):
            walk.change(
                f"{relative}: row differs from the file (size or sha256); updating the row",
                partial(
                    LoraArtifact.objects.filter(pk=row.pk).update,
                    size=info.size_bytes,
                    sha256=info.sha256,
                    metadata=info.metadata,
                ),
            )
    # Files named lora_<n> keep their n when it is free; the others follow, oldest first.
    new_files.sort(
        key=lambda item: (
            layout.lora_number(item[0]) is None,
            layout.lora_number(item[0]) or 0,
            item[0].stat().st_mtime,
            item[0].name,
        )
    )
    next_free = max(
        [
            session.next_lora_number - 1,
            *taken_numbers,
            *(n for p, _ in new_files if (n := layout.lora_number(p))),
        ]
    )
    for path, info in new_files:
        number = layout.lora_number(path)
        if number is None or number in taken_numbers:
            next_free += 1
            number = next_free
        taken_numbers.add(number)
        walk.change(
            f"{storage.relative_path(path)} has no row; adding it as LoRA number {number}",
            partial(
                LoraArtifact.objects.create,
                session=session,
                number=number,
                filename=path.name,
                size=info.size_bytes,
                sha256=info.sha256,
                source=LoraArtifact.Source.FOUND,
                metadata=info.metadata,
            ),
        )
    present = {path.name for path in on_disk}
    for name, row in loras.items():
        if name not in present:
            walk.change(
                f"LoRA {name} (number {row.number}) is missing; removing the row",
                LoraArtifact.objects.filter(pk=row.pk).delete,
            )
    return taken_numbers


def _reconcile_checkpoints(walk: _Walk) -> None:
    """Checkpoint rows follow the `*.safetensors` files in the session's `checkpoints/`.

    A row whose file is gone goes; a row that differs from its (readable) file follows it,
    as a LoRA's does. A file without a row is only a note: it is never a LoRA of the
    session (those lie at its root) and never gets a number.
    """
    session = walk.session
    rows = {row.filename: row for row in TrainingCheckpoint.objects.filter(session=session)}
    on_disk = {
        path.name: path for path in layout.lora_files_on_disk(walk.folder / CHECKPOINTS_FOLDER)
    }
    for name, path in on_disk.items():
        relative = storage.relative_path(path)
        row = rows.get(name)
        if row is None:
            walk.report.notes.append(
                f"{relative}: no checkpoint row (not a LoRA of the session); left as it is"
            )
            continue
        if not walk.deep and row.size == path.stat().st_size and row.sha256 == sha256_file(path):
            continue
        try:
            info = inspect_lora_file(path)
        except EngineError as error:
            walk.report.problems.append(f"{relative}: not a readable LoRA file ({error})")
            continue
        if (row.size, row.sha256) != (info.size_bytes, info.sha256):
            walk.change(
                f"{relative}: the row of run {row.run_id}'s checkpoint at step {row.step} "
                "differs from the file (size or sha256); updating the row",
                partial(
                    TrainingCheckpoint.objects.filter(pk=row.pk).update,
                    size=info.size_bytes,
                    sha256=info.sha256,
                    metadata=info.metadata,
                ),
            )
    for name, row in rows.items():
        if name not in on_disk:
            relative = storage.relative_path(walk.folder / CHECKPOINTS_FOLDER / name)
            walk.change(
                f"{relative}: checkpoint of run {row.run_id} at step {row.step} is missing; "
                "removing the row",
                TrainingCheckpoint.objects.filter(pk=row.pk).delete,
            )


def _reconcile_samples(walk: _Walk) -> None:
    """A sample image row whose PNG is gone goes, one whose size differs (the stored-MB
    quota counts it) is updated; a file in `samples/` without a row is a note."""
    recorded = set()
    samples = TrainingSample.objects.filter(run__session=walk.session).select_related("run")
    for sample in samples:
        path = sample_path(sample)
        recorded.add(path)
        if not path.is_file():
            walk.change(
                f"{storage.relative_path(path)}: sample image of run {sample.run_id} (step "
                f"{sample.step}) is missing; removing the row",
                TrainingSample.objects.filter(pk=sample.pk).delete,
            )
        elif path.stat().st_size != sample.size:
            walk.change(
                f"{storage.relative_path(path)}: sample image's size differs from its row; "
                "updating the row",
                partial(
                    TrainingSample.objects.filter(pk=sample.pk).update, size=path.stat().st_size
                ),
            )
    folder = walk.folder / SAMPLES_FOLDER
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            relative_parts = path.relative_to(folder).parts
            if path.is_file() and path not in recorded:
                if not any(layout.is_hidden(Path(part)) for part in relative_parts):
                    walk.report.notes.append(
                        f"{storage.relative_path(path)}: no sample image row; left as it is"
                    )


def _reconcile_counters(walk: _Walk, group_numbers: set[int], lora_numbers: set[int]) -> None:
    """Numbers are never reused, so the counters only ever move past what exists."""
    session = walk.session
    next_group = max([session.next_group_number, *(n + 1 for n in group_numbers)])
    next_lora = max([session.next_lora_number, *(n + 1 for n in lora_numbers)])
    if (next_group, next_lora) != (session.next_group_number, session.next_lora_number):
        walk.change(
            f"counters move to next group {next_group}, next LoRA number {next_lora}",
            lambda: Session.objects.filter(pk=session.pk).update(
                next_group_number=next_group, next_lora_number=next_lora
            ),
        )


def _reconcile_leftovers(walk: _Walk) -> None:
    """Stale leftovers of interrupted writes go (not what lies inside one: it goes whole),
    and so does the stale resume state of a run that is no longer queued or running. The
    state of a queued or running run is left alone, whatever its age, with all inside it."""
    folder = walk.folder
    if not folder.is_dir():
        return
    active_runs = set(
        TrainingRun.objects.filter(
            session=walk.session, status__in=TrainingRun.ACTIVE_STATUSES
        ).values_list("pk", flat=True)
    )
    for path in sorted(folder.rglob("*")):
        inside = any(
            layout.is_leftover(parent) or layout.resume_state_run_id(parent) is not None
            for parent in path.relative_to(folder).parents
            if parent.name
        )
        if inside:
            continue
        if layout.is_leftover(path) and layout.is_stale(path):
            walk.change(
                f"{storage.relative_path(path)} is a stale leftover of an interrupted "
                "write; removing it",
                partial(layout.remove, path),
            )
        elif layout.is_stale_resume_state(path, active_runs):
            walk.change(
                f"{storage.relative_path(path)} is the resume state of run "
                f"{layout.resume_state_run_id(path)}, which is not queued or running; "
                "removing it",
                partial(layout.remove, path),
            )


def _note_unindexed_training_data(walk: _Walk, indexed_images: set[str]) -> None:
    """Captioned images outside the numbered groups train too, without a row: a note."""
    if not walk.folder.is_dir():
        return
    for pair in find_training_pairs(walk.folder):
        relative = storage.relative_path(pair.image_path)
        if relative not in indexed_images and not layout.is_hidden(pair.image_path):
            walk.report.notes.append(f"{relative}: training data outside a numbered group folder")


# --- The whole data dir -------------------------------------------------------------------


def adopt_session_folder(session_id: int, folder: Path, owner_id: int | None = None) -> None:
    """A Session row for a folder that has none, keeping its id and, roughly, its age;
    it belongs to `owner_id`, else to the default owner."""
    created = datetime.fromtimestamp(folder.stat().st_mtime, tz=UTC)
    with transaction.atomic():
        Session.objects.create(pk=session_id, owner_id=owner_id or default_owner().pk)
        # auto_now_add ignores a given value; an update does not.
        Session.objects.filter(pk=session_id).update(created_at=created)
    reset_session_id_sequence()


def reset_session_id_sequence() -> None:
    """After rows were created with explicit ids, new sessions must number past them.

    PostgreSQL's sequence does not notice explicit ids; SQLite's AUTOINCREMENT does, and
    Django returns no statements for it.
    """
    statements = connection.ops.sequence_reset_sql(no_style(), [Session])
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def session_ids() -> set[int]:
    return set(Session.objects.values_list("pk", flat=True))


def data_dir_report(known: set[int]) -> Report:
    """What lies in session_data beside the session folders: unknown sessions, leftovers."""
    report = Report()
    root = settings.SESSION_DATA_DIR
    folders = layout.session_folders(root)
    for sid in sorted(folders.keys() - known):
        report.changes.append(
            Change(
                sid,
                f"session folder {folders[sid].name} has no row; adopting it",
                partial(adopt_session_folder, sid, folders[sid]),
            )
        )
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if layout.is_hidden(path):
                if layout.is_leftover(path) and layout.is_stale(path):
                    report.changes.append(_leftover_removal(path))
            elif not layout.SESSION_FOLDER.match(path.name):
                report.notes.append(f"{storage.relative_path(path)}: not a session folder")
    # Uploads whose process was killed while they were being checked stay in staging.
    staging = storage.staging_dir()
    if staging.is_dir():
        for path in sorted(staging.iterdir()):
            if layout.is_leftover(path) and layout.is_stale(path):
                report.changes.append(_leftover_removal(path))
    return report


def _leftover_removal(path: Path) -> Change:
    return Change(
        None,
        f"{storage.relative_path(path)} is a stale leftover; removing it",
        lambda: layout.remove(path),
    )
