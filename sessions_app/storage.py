"""Where things live in the data dir, and the one way files get written there.

Every write goes to a `*.tmp` beside its target, is fsynced, then `os.replace`d into
place, so no reader ever sees half a file.
"""

import hashlib
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

from django.conf import settings

from sdxl_engine.files import write_atomically


def session_dir(session_id: int) -> Path:
    return settings.SESSION_DATA_DIR / f"session_{session_id}"


def relative_path(path: Path) -> str:
    """The path as stored in the database: relative to the data dir, with forward slashes."""
    return path.relative_to(settings.DATA_DIR).as_posix()


def absolute_path(relative: str) -> Path:
    return settings.DATA_DIR / relative


def atomic_write_bytes(target: Path, data: bytes) -> None:
    write_atomically(target, lambda temp: temp.write_bytes(data))


def staging_dir() -> Path:
    """Where uploads are checked before they enter a session: beside the session folders,
    on the same filesystem, so one rename moves a checked file into place."""
    return settings.SESSION_DATA_DIR / ".staging"


def staging_path(name: str) -> Path:
    """A unique temporary path for an upload being checked, outside every session folder
    but on the same filesystem, so it can be renamed into one atomically."""
    folder = staging_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return temp_path_for(folder / name)


def temp_path_for(target: Path) -> Path:
    """A unique `*.tmp` name beside `target` (same filesystem, so a rename is atomic)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def move_aside(folder: Path) -> Path | None:
    """Renames a folder (or a file) out of the way in one atomic step; returns where it went.

    Deleting a large folder takes time; renaming first means nobody sees it half-deleted.
    """
    if not folder.exists():
        return None
    trash = folder.with_name(f".deleted-{folder.name}-{uuid.uuid4().hex}")
    os.replace(folder, trash)
    return trash


def remove_tree(path: Path | None) -> None:
    """Removes what move_aside moved away: a folder with all in it, or a file."""
    if path is None:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# What interrupted writes, deletes and imports leave behind (temp_path_for,
# write_atomically, move_aside, archive imports, training output): never data, and the
# only files maintenance ever removes (datadir_app.layout, once stale).
LEFTOVER_PREFIXES = (".deleted-", ".importing-", ".training-run-")


def is_leftover_name(name: str) -> bool:
    return name.endswith(".tmp") or name.startswith(LEFTOVER_PREFIXES)


def is_plain_relative_name(name: str) -> bool:
    """A relative `/`-separated path with no `..`, no drive, no backslash, no NUL: nothing
    that could name a place outside a folder it were unpacked into (zip members)."""
    path = PurePosixPath(name)
    return bool(
        name
        and "\\" not in name
        and "\0" not in name
        and not path.is_absolute()
        and ":" not in path.parts[0]
        and ".." not in path.parts
    )
