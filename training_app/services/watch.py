"""What a run keeps along the way: checkpoints, sample images, and its resume state.

On disk, in the session's folder (docs/api.md, "On disk"):
- `checkpoints/lora_run<run>_step<step>.safetensors`: a checkpoint, a LoRA file a client
  can fetch and generate with by its name (`lora_filename`);
- `samples/run_<run>/step<step>_<index>.png`: a sample image;
- `.resume-run-<run>/`: what the engine saves to continue the run after a lost worker,
  removed once the run ends. Hidden: it is neither training data nor a LoRA.
"""

import logging
from functools import partial
from pathlib import Path

from django.db import transaction
from PIL import Image

from sdxl_engine.files import replace_with_retry, sha256_file, write_atomically
from sessions_app import storage
from training_app.models import TrainingCheckpoint, TrainingRun, TrainingSample

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
SAMPLES_FOLDER = "samples"


def resume_state_dir(session_id: int, run_id: int) -> Path:
    return storage.session_dir(session_id) / f".resume-run-{run_id}"


def resume_state_remove(session_id: int, run_id: int) -> None:
    """The run ended (completed, failed for good or cancelled): nothing will resume it."""
    storage.remove_tree(resume_state_dir(session_id, run_id))


def checkpoint_filename(run_id: int, step: int) -> str:
    """A checkpoint's name in the session's checkpoints/ folder."""
    return f"lora_run{run_id}_step{step}.safetensors"


def run_samples_folder(run_id: int) -> str:
    """Where a run's sample images are, relative to the session's folder."""
    return f"{SAMPLES_FOLDER}/run_{run_id}"


def checkpoint_path(checkpoint: TrainingCheckpoint) -> Path:
    return storage.session_dir(checkpoint.session_id) / CHECKPOINTS_FOLDER / checkpoint.filename


def checkpoint_store(run: TrainingRun, step: int, written: Path, sha256: str) -> None:
    """Moves a checkpoint the engine wrote into the session's checkpoints/ folder and
    records it; a file whose bytes are not what was written is dropped, with a warning."""
    from sdxl_engine.lora_files import read_lora_metadata

    name = checkpoint_filename(run.pk, step)
    target = storage.session_dir(run.session_id) / CHECKPOINTS_FOLDER / name
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_with_retry(written, target)
    if sha256_file(target) != sha256:
        target.unlink(missing_ok=True)
        logger.warning("checkpoint %s of run %s was altered on disk; dropped", name, run.pk)
        return
    metadata = read_lora_metadata(target)
    # A resumed run saves its checkpoints again past the resume step; earlier ones stay.
    TrainingCheckpoint.objects.update_or_create(
        run=run,
        step=step,
        defaults={
            "session_id": run.session_id,
            "filename": name,
            "size": target.stat().st_size,
            "sha256": sha256,
            "metadata": metadata,
            "eval_loss": header_score(metadata, "eval_loss"),
            "similarity": header_score(metadata, "similarity"),
        },
    )


def header_score(metadata: dict[str, str], name: str) -> float | None:
    """A score a LoRA's header records (sdxl_service.eval_loss, .similarity), or None."""
    from sdxl_engine.lora_files import METADATA_PREFIX

    try:
        return float(metadata[METADATA_PREFIX + name])
    except (KeyError, ValueError):
        return None


def sample_path(sample: TrainingSample) -> Path:
    folder = storage.session_dir(sample.run.session_id) / run_samples_folder(sample.run_id)
    return folder / sample.filename


def samples_store(run: TrainingRun, step: int, samples: list[tuple[str, Image.Image]]) -> None:
    """Writes a step's sample images as PNGs (each atomically) and records them."""
    folder = storage.session_dir(run.session_id) / run_samples_folder(run.pk)
    folder.mkdir(parents=True, exist_ok=True)
    with transaction.atomic():
        for index, (prompt, image) in enumerate(samples):
            name = f"step{step}_{index}.png"
            write_atomically(folder / name, partial(_save_png, image))
            TrainingSample.objects.update_or_create(
                run=run,
                step=step,
                index=index,
                defaults={
                    "prompt": prompt,
                    "filename": name,
                    "size": (folder / name).stat().st_size,
                },
            )


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")
