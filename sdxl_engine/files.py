"""Atomic writes: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Windows refuses to replace a file another process has open (a reader streaming the
# previous LoRA, an antivirus scan); such locks are short-lived, so retry for a while.
_REPLACE_ATTEMPTS = 20
_REPLACE_RETRY_SECONDS = 0.1


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(root: Path) -> None:
    """Flush every file below `root` to disk, so a later rename publishes complete files."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(folder, name))


def replace_with_retry(source: Path, target: Path) -> None:
    for attempt in range(_REPLACE_ATTEMPTS):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == _REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(_REPLACE_RETRY_SECONDS)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, fsync the result and rename it onto `path`.

    What `write` returns is ignored (so `tmp.write_bytes` and friends fit as they are).

    The temporary file sits beside `path` (same file system, so the rename is atomic) and
    is removed if writing fails.
    """
    tmp_path = path.with_name(path.name + ".tmp")
    try:
        write(tmp_path)
        fsync_file(tmp_path)
        replace_with_retry(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def publish_folder(built: Path, target: Path, is_complete: Callable[[Path], bool]) -> None:
    """Renames the finished folder `built` onto `target` (beside it: one atomic rename),
    unless `target` is complete already; when another process published it first, theirs
    is as good as ours and `built` is left for the caller to remove."""
    if is_complete(target):
        return
    try:
        os.replace(built, target)
    except OSError:
        if not is_complete(target):
            raise


def build_folder_once(
    folder: Path, build: Callable[[Path], object], is_complete: Callable[[Path], bool]
) -> Path:
    """`folder`, made by `build(staging)` in a temporary folder beside it, flushed to disk
    and published by publish_folder, unless it is complete already; returns `folder`. A
    folder that exists is whole, and two processes building at once end with one."""
    folder = Path(folder)
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        build(staging)
        fsync_tree(staging)
        publish_folder(staging, folder, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
