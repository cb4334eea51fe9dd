"""Keeping the index (rows) in line with the data dir (files): adopt, rescan, verify.

The files are the truth. What a row says about a file is brought in line with it; a file
that should have a row gets one; a row whose file is gone goes. Nothing here deletes or
rewrites a person's file: a file that cannot be read (an image that does not decode, a
LoRA whose header is broken) is reported for a person to look at, and its row, if any,
is left as it is. The only files removed are stale leftovers of interrupted writes and
deletes (`*.tmp`, `.deleted-*`), which never held anything a reader could see.

What has a row, per session folder `session_<id>/` (API.md's layout):
- each numbered sub-folder `<n>/` is an ImageGroup;
- each image in it (`.png .jpg .jpeg .webp .bmp`) with a `.txt` of the same stem beside
  it is a TrainingImage, the `.txt` its caption;
- each `*.safetensors` at the session's root is a LoraArtifact; `lora_<n>` is number n.
Captioned images elsewhere in the folder still train (API.md) but have no row: they are
listed as notes, never as mismatches.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.core.management.color import no_style
from django.db import connection, transaction

from sdxl_engine.dataset import IMAGE_SUFFIXES, find_training_pairs
from sdxl_engine.errors import EngineError
from sdxl_engine.files import sha256_file, write_atomically
from sdxl_engine.lora_files import inspect_lora_file
from sdxl_service.errors import ServiceError
from sessions_app import storage
from sessions_app.images import check_image
from sessions_app.locking import session_lock
from sessions_app.models import ImageGroup, Session, TrainingImage
from training_app.models import Generation, LoraArtifact

logger = logging.getLogger(__name__)

SESSION_FOLDER = re.compile(r"^session_([1-9][0-9]{0,18})$")
LORA_NUMBERED = re.compile(r"^lora_([1-9][0-9]{0,9})\.safetensors$")
# A leftover younger than this may belong to a write still under way: it is left alone.
STALE_LEFTOVER_AGE_S = 3600.0

Progress = Callable[[Iterable], Iterable]


def _no_progress(items: Iterable, **_kwargs) -> Iterable:
    return items


@dataclass(frozen=True)
class Change:
    """One way the rows differ from the files; `apply` makes them agree."""

    session_id: int | None
    text: str
    apply: Callable[[], None] = field(repr=False, compare=False)


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)  # repairable without losing data
    problems: list[str] = field(default_factory=list)  # need a person
    notes: list[str] = field(default_factory=list)  # worth knowing, not a mismatch
    fixed: list[Change] = field(default_factory=list)  # changes already applied

    def extend(self, other: Report) -> None:
        self.changes += other.changes
        self.problems += other.problems
        self.notes += other.notes
        self.fixed += other.fixed

    @property
    def clean(self) -> bool:
        return not self.changes and not self.problems


# --- One session ---------------------------------------------------------------------


# What interrupted writes, deletes and imports leave behind (storage.temp_path_for,
# write_atomically, storage.move_aside, archive imports, training output): the only files
# maintenance ever removes.
_LEFTOVER_PREFIXES = (".deleted-", ".importing-", ".training-run-")


def is_leftover(path: Path) -> bool:
    return path.name.endswith(".tmp") or path.name.startswith(_LEFTOVER_PREFIXES)


def is_hidden(path: Path) -> bool:
    """Hidden and temporary files never hold data the service indexes or exports."""
    return path.name.startswith(".") or path.name.endswith(".tmp")


def _is_stale(path: Path) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > STALE_LEFTOVER_AGE_S
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _group_numbers_on_disk(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {
        int(child.name)
        for child in folder.iterdir()
        # "07" is not group 7's folder: the service names folders str(n).
        if child.is_dir()
        and child.name.isascii()
        and child.name.isdigit()
        and str(int(child.name)) == child.name
    }


def _captioned_images(group_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in group_dir.iterdir()
        if path.is_file()
        and not is_hidden(path)
        and path.suffix.lower() in IMAGE_SUFFIXES
        and path.with_suffix(".txt").is_file()
    )


def _lora_files_on_disk(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not is_hidden(path) and path.suffix == ".safetensors"
    )


def _read_caption(image_path: Path) -> str:
    return image_path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")


def _image_facts(path: Path) -> dict:
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


def reconcile_session(session: Session, *, deep: bool) -> Report:
    """How the session's rows differ from its folder, each difference with its repair.

    `deep` also decodes every image and reads every LoRA header (verify); otherwise only
    files that are new or changed are read (rescan). Call under the session lock when the
    changes are to be applied.
    """
    report = Report()
    folder = storage.session_dir(session.pk)
    sid = session.pk

    def change(text: str, apply: Callable[[], None]) -> None:
        report.changes.append(Change(sid, f"session {sid}: {text}", apply))

    if not folder.is_dir():
        change(
            f"folder {storage.relative_path(folder)} is missing; creating it empty",
            lambda: folder.mkdir(parents=True, exist_ok=True),
        )

    # Groups.
    on_disk = _group_numbers_on_disk(folder)
    groups = {group.number: group for group in ImageGroup.objects.filter(session=session)}
    for number in sorted(on_disk - groups.keys()):
        change(
            f"group folder {number}/ has no row; adding it",
            lambda n=number: ImageGroup.objects.create(session=session, number=n),
        )
    for number in sorted(groups.keys() - on_disk):
        change(
            f"group {number} has no folder; removing its row and its images' rows",
            lambda n=number: ImageGroup.objects.filter(session=session, number=n).delete(),
        )

    # Images in the numbered groups.
    rows = {
        image.file: image
        for image in TrainingImage.objects.filter(group__session=session).select_related("group")
    }
    files = {
        storage.relative_path(path): (number, path)
        for number in sorted(on_disk)
        for path in _captioned_images(folder / str(number))
    }
    for relative, (number, path) in files.items():
        row = rows.get(relative)
        if row is not None and not deep and row.size == path.stat().st_size:
            if row.sha256 == sha256_file(path) and row.caption == _read_caption(path):
                continue
        try:
            facts = _image_facts(path)
        except ServiceError as error:
            report.problems.append(
                f"{relative}: cannot be used as a training image ({error.message})"
            )
            continue
        caption = _read_caption(path)
        if row is None:
            change(
                f"{relative} has no row; adding it",
                lambda n=number, r=relative, f=facts, c=caption: TrainingImage.objects.create(
                    group=ImageGroup.objects.get(session=session, number=n),
                    file=r,
                    caption=c,
                    **f,
                ),
            )
            continue
        differing = [name for name, value in facts.items() if getattr(row, name) != value] + (
            ["caption"] if row.caption != caption else []
        )
        if differing:
            change(
                f"{relative}: row differs from the file ({', '.join(differing)}); updating the row",
                lambda pk=row.pk, f=facts, c=caption: TrainingImage.objects.filter(pk=pk).update(
                    caption=c, **f
                ),
            )
    for relative, row in rows.items():
        if relative in files:
            continue
        path = storage.absolute_path(relative)
        missing = "caption" if path.is_file() else "file"
        if row.group.number not in on_disk:
            continue  # its group's row goes, and takes this one with it
        change(
            f"{relative}: {missing} is missing; removing the row",
            lambda pk=row.pk: TrainingImage.objects.filter(pk=pk).delete(),
        )

    # LoRA files at the session's root.
    loras = {
        artifact.filename: artifact for artifact in LoraArtifact.objects.filter(session=session)
    }
    taken_numbers = {artifact.number for artifact in loras.values()}
    new_files = []
    for path in _lora_files_on_disk(folder):
        row = loras.get(path.name)
        relative = storage.relative_path(path)
        if row is not None and not deep and row.size == path.stat().st_size:
            if row.sha256 == sha256_file(path):
                continue
        try:
            info = inspect_lora_file(path)
        except EngineError as error:
            report.problems.append(f"{relative}: not a readable LoRA file ({error})")
            continue
        if row is None:
            new_files.append((path, info))
        elif (row.size, row.sha256) != (info.size_bytes, info.sha256):
            change(
                f"{relative}: row differs from the file (size or sha256); updating the row",
                lambda pk=row.pk, i=info: LoraArtifact.objects.filter(pk=pk).update(
                    size=i.size_bytes, sha256=i.sha256, metadata=i.metadata
                ),
            )
    # Files named lora_<n> keep their n when it is free; the others follow, oldest first.
    new_files.sort(
        key=lambda item: (
            _lora_number(item[0]) is None,
            _lora_number(item[0]) or 0,
            item[0].stat().st_mtime,
            item[0].name,
        )
    )
    next_free = max(
        [
            session.next_lora_number - 1,
            *taken_numbers,
            *(n for p, _ in new_files if (n := _lora_number(p))),
        ]
    )
    for path, info in new_files:
        number = _lora_number(path)
        if number is None or number in taken_numbers:
            next_free += 1
            number = next_free
        taken_numbers.add(number)
        change(
            f"{storage.relative_path(path)} has no row; adding it as LoRA number {number}",
            lambda p=path, i=info, n=number: LoraArtifact.objects.create(
                session=session,
                number=n,
                filename=p.name,
                size=i.size_bytes,
                sha256=i.sha256,
                source=LoraArtifact.Source.FOUND,
                metadata=i.metadata,
            ),
        )
    present = {path.name for path in _lora_files_on_disk(folder)}
    for name, row in loras.items():
        if name not in present:
            change(
                f"LoRA {name} (number {row.number}) is missing; removing the row",
                lambda pk=row.pk: LoraArtifact.objects.filter(pk=pk).delete(),
            )

    # Counters: numbers are never reused, so they only ever move past what exists.
    next_group = max([session.next_group_number, *(n + 1 for n in on_disk)])
    next_lora = max([session.next_lora_number, *(n + 1 for n in taken_numbers)])
    if (next_group, next_lora) != (session.next_group_number, session.next_lora_number):
        change(
            f"counters move to next group {next_group}, next LoRA number {next_lora}",
            lambda: Session.objects.filter(pk=sid).update(
                next_group_number=next_group, next_lora_number=next_lora
            ),
        )

    # Leftovers of interrupted writes, and training data that has no row.
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            inside_leftover = any(
                is_leftover(parent) for parent in path.relative_to(folder).parents if parent.name
            )
            if is_leftover(path) and not inside_leftover and _is_stale(path):
                change(
                    f"{storage.relative_path(path)} is a stale leftover of an interrupted "
                    "write; removing it",
                    lambda p=path: _remove(p),
                )
        for pair in find_training_pairs(folder):
            relative = storage.relative_path(pair.image_path)
            if relative not in files and not is_hidden(pair.image_path):
                report.notes.append(f"{relative}: training data outside a numbered group folder")
    return report


def _lora_number(path: Path) -> int | None:
    match = LORA_NUMBERED.match(path.name)
    return int(match[1]) if match else None


def _apply(report: Report) -> None:
    for change in report.changes:
        change.apply()
    report.fixed += report.changes
    report.changes = []


def rescan_session(session_id: int) -> Report:
    """Brings one session's rows in line with its folder; `fixed` lists what changed."""
    with session_lock(session_id) as session:
        report = reconcile_session(session, deep=False)
        _apply(report)
    for change in report.fixed:
        logger.debug("rescan: %s", change.text)
    return report


# --- The whole data dir -------------------------------------------------------------------


def _session_folders(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    return {
        int(match[1]): child
        for child in sorted(root.iterdir())
        if child.is_dir() and (match := SESSION_FOLDER.match(child.name))
    }


def _adopt(session_id: int, folder: Path) -> None:
    """A Session row for a folder that has none, keeping its id and, roughly, its age."""
    created = datetime.fromtimestamp(folder.stat().st_mtime, tz=UTC)
    with transaction.atomic():
        Session.objects.create(pk=session_id)
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


def _data_dir_report(known: set[int]) -> Report:
    """What lies in session_data beside the session folders: unknown sessions, leftovers."""
    report = Report()
    root = settings.SESSION_DATA_DIR
    folders = _session_folders(root)
    for sid in sorted(folders.keys() - known):
        report.changes.append(
            Change(
                sid,
                f"session folder {folders[sid].name} has no row; adopting it",
                lambda s=sid: _adopt(s, folders[s]),
            )
        )
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if is_hidden(path):
                if is_leftover(path) and _is_stale(path):
                    report.changes.append(_leftover_removal(path))
            elif not SESSION_FOLDER.match(path.name):
                report.notes.append(f"{storage.relative_path(path)}: not a session folder")
    # Uploads whose process was killed while they were being checked stay in staging.
    staging = storage.staging_dir()
    if staging.is_dir():
        for path in sorted(staging.iterdir()):
            if is_leftover(path) and _is_stale(path):
                report.changes.append(_leftover_removal(path))
    return report


def _leftover_removal(path: Path) -> Change:
    return Change(
        None,
        f"{storage.relative_path(path)} is a stale leftover; removing it",
        lambda: _remove(path),
    )


def _session_ids() -> set[int]:
    return set(Session.objects.values_list("pk", flat=True))


def rescan(session_id: int | None = None, progress: Progress = _no_progress) -> Report:
    """Brings the rows of one session, or of every session and session folder, in line."""
    if session_id is not None:
        return rescan_session(session_id)
    report = _data_dir_report(_session_ids())
    _apply(report)
    for sid in progress(sorted(_session_ids())):
        report.extend(rescan_session(sid))
    return report


def verify(fix: bool = False, progress: Progress = _no_progress) -> Report:
    """Every row against its file and every file against a row, decoding and hashing all.

    With `fix`, every repair that loses no data is applied (listed in `fixed`), then all
    is checked again: `changes` and `problems` say what is still wrong.
    """
    report = _data_dir_report(_session_ids())
    if fix:
        _apply(report)
    for sid in progress(sorted(_session_ids())):
        with session_lock(sid) as session:
            session_report = reconcile_session(session, deep=True)
            if fix:
                _apply(session_report)
        report.extend(session_report)
    report.problems += _generation_problems()
    if fix and report.fixed:
        again = verify(fix=False, progress=progress)
        again.fixed = report.fixed
        return again
    return report


def _generation_problems() -> list[str]:
    problems = []
    finished = Generation.objects.filter(status=Generation.Status.COMPLETED, image_count__gt=0)
    for generation_id, count in finished.values_list("pk", "image_count"):
        folder = settings.GENERATIONS_DIR / str(generation_id)
        missing = [i for i in range(count) if not (folder / f"{i}.png").is_file()]
        if missing:
            problems.append(f"generation {generation_id}: images {missing} are missing")
    return problems


# --- Adopting a folder of the original service ---------------------------------------------


@dataclass
class ImportResult:
    sessions: list[int] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    copied: int = 0


def import_sessions(source: Path, copy: bool, progress: Progress = _no_progress) -> ImportResult:
    """Adopts a `session_data/` folder (or a data dir holding one) written by the original.

    Without `copy`, the folder must be this service's own session_data (its files stay
    where they are); with `copy`, its files are copied in, never over a different file.
    Session ids are kept. Running it again changes nothing.
    """
    source = Path(source).resolve()
    if (source / "session_data").is_dir():
        source = source / "session_data"
    folders = _session_folders(source)
    if not folders:
        raise ServiceError(f"{source} holds no session_<id> folders; nothing to import")
    own = settings.SESSION_DATA_DIR.resolve()
    if not copy and source != own:
        raise ServiceError(
            f"{source} is not this service's session data folder ({own}); pass --copy to "
            f"copy it in, or set SDXL_DATA_DIR to {source.parent} to use it where it is"
        )
    result = ImportResult()
    for session_id, folder in progress(sorted(folders.items())):
        if copy:
            result.copied += _copy_session_folder(
                folder, storage.session_dir(session_id), result.report
            )
        if not Session.objects.filter(pk=session_id).exists():
            adopt = Change(session_id, f"session {session_id}: adopted, id kept", lambda: None)
            _adopt(session_id, folder)
            result.report.fixed.append(adopt)
        result.report.extend(rescan_session(session_id))
        result.sessions.append(session_id)
    return result


def _copy_session_folder(source: Path, target: Path, report: Report) -> int:
    """Copies every file not yet in `target`; a different file already there is kept."""
    copied = 0
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (
            not path.is_file()
            or path.is_symlink()
            or any(is_hidden(Path(p)) for p in relative.parts)
        ):
            continue
        destination = target / relative
        if destination.exists():
            if sha256_file(destination) != sha256_file(path):
                report.problems.append(
                    f"{storage.relative_path(destination)} exists and differs from {path}; "
                    "kept the existing file"
                )
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(destination, lambda temp, p=path: shutil.copyfile(p, temp))
        copied += 1
    return copied
