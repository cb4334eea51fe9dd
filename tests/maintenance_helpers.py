"""Builders for the maintenance command tests: folders as the original service wrote them."""

import io
import os
import time
from pathlib import Path

from django.core.management import call_command
from PIL import Image

from sessions_app import storage
from sessions_app.models import ImageGroup, Session, TrainingImage
from tests.helpers import image_bytes, lora_bytes
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services.watch import checkpoint_store, samples_store

FLASK_IMAGES = [("PNG", "png", "red", "a red apple"), ("JPEG", "jpg", "blue", "a blue cup")]


def flask_session_data(root: Path, session_ids=(3, 7)) -> Path:
    """A session_data/ folder laid out as docs/api.md shows: groups, captions, lora_<n> files."""
    for session_id in session_ids:
        folder = root / f"session_{session_id}"
        for number, (image_format, extension, color, caption) in enumerate(FLASK_IMAGES):
            group = folder / str(number)
            group.mkdir(parents=True)
            (group / f"0.{extension}").write_bytes(image_bytes(image_format, color=color))
            (group / "0.txt").write_text(caption, encoding="utf-8")
        for number in (1, 2):
            (folder / f"lora_{number}.safetensors").write_bytes(lora_bytes(seed=number))
    return root


def run(*args, **options) -> str:
    """Runs a manage.py command in-process; returns what it printed."""
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def snapshot(data_dir: Path) -> tuple:
    """Every row the maintenance commands touch, and every file with its bytes."""
    files = {
        path.relative_to(data_dir).as_posix(): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file() and "session_data" in path.parts
    }
    return (
        list(
            Session.objects.values_list("pk", "next_group_number", "next_lora_number", "created_at")
        ),
        list(ImageGroup.objects.values_list("session_id", "number")),
        list(
            TrainingImage.objects.values_list(
                "group__session_id", "file", "caption", "image_format", "size", "sha256"
            )
        ),
        list(
            LoraArtifact.objects.values_list(
                "session_id", "number", "filename", "source", "size", "sha256", "metadata"
            )
        ),
        files,
    )


def make_old(path: Path, seconds: float = 2 * 3600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def stored_checkpoint(run: TrainingRun, step: int, seed: int = 0) -> TrainingCheckpoint:
    """A checkpoint of `run` at `step`, stored as the worker stores one (file, then row)."""
    data = lora_bytes(seed=seed)
    written = storage.staging_path("checkpoint.safetensors")
    written.write_bytes(data)
    checkpoint_store(run, step, written, storage.sha256_bytes(data))
    return TrainingCheckpoint.objects.get(run=run, step=step)


def stored_samples(run: TrainingRun, step: int, prompts=("a red square",)) -> list[TrainingSample]:
    """Sample images of `run` at `step`, stored as the worker stores them."""
    samples_store(run, step, [(prompt, Image.new("RGB", (16, 16), "red")) for prompt in prompts])
    return list(TrainingSample.objects.filter(run=run, step=step))
