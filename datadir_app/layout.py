"""What lies where in the data dir, as docs/api.md lays it out, and what is a leftover.

What has a row, per session folder `session_<id>/`:
- each numbered sub-folder `<n>/` is an ImageGroup;
- each image in it (`.png .jpg .jpeg .webp .bmp`) with a `.txt` of the same stem beside
  it is a TrainingImage, the `.txt` its caption, a `<stem>_mask.png` beside it its mask
  (sdxl_engine.dataset.mask_path_for: a mask is never an image of its own);
- each `*.safetensors` at the session's root is a LoraArtifact; `lora_<n>` is number n;
- each `checkpoints/*.safetensors` is a run's TrainingCheckpoint (no number: never a
  LoraArtifact), each `samples/run_<id>/*.png` a TrainingSample of run <id>;
- `.resume-run-<id>/` is run <id>'s resume state: no row, kept while the run is queued or
  running; once the run has ended (or has no row), a stale one is a leftover.
Captioned images elsewhere in the folder still train (docs/api.md) but have no row.
"""

import re
import shutil
import time
from pathlib import Path

from sdxl_engine.dataset import IMAGE_SUFFIXES, is_mask_path
from sessions_app import storage

SESSION_FOLDER = re.compile(r"^session_([1-9][0-9]{0,18})$")
LORA_NUMBERED = re.compile(r"^lora_([1-9][0-9]{0,9})\.safetensors$")
# A leftover younger than this may belong to a write still under way: it is left alone.
STALE_LEFTOVER_AGE_S = 3600.0
# training_app.services.watch.resume_state_dir: what a run resumes from after a lost worker.
RESUME_STATE = re.compile(r"^\.resume-run-([1-9][0-9]{0,18})$")


def is_leftover(path: Path) -> bool:
    return storage.is_leftover_name(path.name)


def resume_state_run_id(path: Path) -> int | None:
    """The run whose resume state `path` is (`.resume-run-<id>`), else None."""
    match = RESUME_STATE.match(path.name)
    return int(match[1]) if match else None


def is_stale_resume_state(path: Path, active_run_ids: set[int]) -> bool:
    """A resume state no run will resume from: its run is not among `active_run_ids` (the
    queued and running ones: ended, or no row at all), and it has not changed for as long
    as any leftover is given. Its run's status decides, never its age alone: a running run
    may save its state less often than that."""
    run_id = resume_state_run_id(path)
    return run_id is not None and run_id not in active_run_ids and is_stale(path)


def is_hidden(path: Path) -> bool:
    """Hidden and temporary files never hold data the service indexes or exports."""
    return path.name.startswith(".") or path.name.endswith(".tmp")


def is_stale(path: Path) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > STALE_LEFTOVER_AGE_S
    except FileNotFoundError:
        return False


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def session_folders(root: Path) -> dict[int, Path]:
    """The `session_<id>` folders under `root`, by id."""
    if not root.is_dir():
        return {}
    return {
        int(match[1]): child
        for child in sorted(root.iterdir())
        if child.is_dir() and (match := SESSION_FOLDER.match(child.name))
    }


def group_numbers_on_disk(folder: Path) -> set[int]:
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


def _image_files(group_dir: Path) -> list[Path]:
    """The visible files of a group folder that have an image's suffix, masks included."""
    if not group_dir.is_dir():
        return []
    return sorted(
        path
        for path in group_dir.iterdir()
        if path.is_file() and not is_hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES
    )


def captioned_images(group_dir: Path) -> list[Path]:
    return [
        path
        for path in _image_files(group_dir)
        if not is_mask_path(path) and path.with_suffix(".txt").is_file()
    ]


def masks_on_disk(group_dir: Path) -> list[Path]:
    """The masks in a group folder, whether or not their image is there."""
    return [path for path in _image_files(group_dir) if is_mask_path(path)]


def read_caption(image_path: Path) -> str:
    return image_path.with_suffix(".txt").read_text(encoding="utf-8", errors="replace")


def lora_files_on_disk(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not is_hidden(path) and path.suffix == ".safetensors"
    )


def lora_number(path: Path) -> int | None:
    """n for a file named `lora_<n>.safetensors`, else None."""
    match = LORA_NUMBERED.match(path.name)
    return int(match[1]) if match else None
