"""`import_sessions`: adopting a `session_data/` folder written by the original service."""

import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from django.conf import settings

from access_app.services import owner_named
from core.errors import ServiceError
from datadir_app import layout
from datadir_app.reconcile import adopt_session_folder
from datadir_app.report import Change, Progress, Report, no_progress
from datadir_app.rescan import rescan_session
from sdxl_engine.files import sha256_file, write_atomically
from sessions_app import storage
from sessions_app.models import Session


@dataclass
class ImportResult:
    sessions: list[int] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    copied: int = 0


def import_sessions(
    source: Path, copy: bool, progress: Progress = no_progress, owner: str | None = None
) -> ImportResult:
    """Adopts a `session_data/` folder (or a data dir holding one) written by the original.
    Sessions it adopts belong to the owner named `owner` (created if new; default: the
    default owner); those already adopted keep theirs.

    Without `copy`, the folder must be this service's own session_data (its files stay
    where they are); with `copy`, its files are copied in, never over a different file.
    Session ids are kept. Running it again changes nothing.
    """
    source = Path(source).resolve()
    if (source / "session_data").is_dir():
        source = source / "session_data"
    folders = layout.session_folders(source)
    if not folders:
        raise ServiceError(f"{source} holds no session_<id> folders; nothing to import")
    own = settings.SESSION_DATA_DIR.resolve()
    if not copy and source != own:
        raise ServiceError(
            f"{source} is not this service's session data folder ({own}); pass --copy to "
            f"copy it in, or set SDXL_DATA_DIR to {source.parent} to use it where it is"
        )
    owner_id = owner_named(owner).pk
    result = ImportResult()
    for session_id, folder in progress(sorted(folders.items())):
        if copy:
            result.copied += _copy_session_folder(
                folder, storage.session_dir(session_id), result.report
            )
        if not Session.objects.filter(pk=session_id).exists():
            adopt = Change(session_id, f"session {session_id}: adopted, id kept", lambda: None)
            adopt_session_folder(session_id, folder, owner_id)
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
            or any(layout.is_hidden(Path(p)) for p in relative.parts)
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
        write_atomically(destination, partial(_copy_file, path))
        copied += 1
    return copied


def _copy_file(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
