"""LoRA files of a session: storing (trained or uploaded), reading, pruning."""

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from django.conf import settings
from django.db import transaction

from access_app.callers import Caller
from access_app.models import Owner
from access_app.quotas import MB, owner_locked, quota_check
from access_app.selectors import owner_stored_bytes
from core.errors import ServiceError
from sdxl_engine.errors import EngineError
from sdxl_engine.files import fsync_file, replace_with_retry, sha256_file
from sessions_app import storage
from sessions_app.locking import session_lock
from sessions_app.selectors import session_get
from training_app.models import (
    Generation,
    GenerationLora,
    LoraArtifact,
    TrainingCheckpoint,
    TrainingRun,
)
from training_app.services.watch import CHECKPOINTS_FOLDER, checkpoint_path

if TYPE_CHECKING:
    from sdxl_engine.lora_files import TargetShapes

logger = logging.getLogger(__name__)

# A stored LoRA name: a plain file name in the session folder, nothing that could climb out.
_LORA_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.safetensors$")
# What /get_lora can send: the stored (diffusers) form, or kohya's for other tools.
LORA_FORMATS = ("diffusers", "kohya")
# An uploaded file's `__metadata__` is kept in its row and answered with it: bounded, so
# that an upload cannot fill the database with it.
MAX_UPLOAD_METADATA_BYTES = 64 * 1024


def _allocate_lora_name(session, requested: str | None) -> tuple[int, str]:
    """The next iteration number (never reused) and the file name to store under."""
    folder = storage.session_dir(session.pk)
    taken = set(LoraArtifact.objects.filter(session=session).values_list("filename", flat=True))
    number = session.next_lora_number
    if requested is not None:
        if requested in taken or (folder / requested).exists():
            raise ServiceError(
                f"a LoRA named {requested} already exists in session {session.pk}", status=409
            )
        return number, requested
    # Files an operator dropped in by hand keep their names: skip past them.
    while f"lora_{number}.safetensors" in taken or (folder / f"lora_{number}.safetensors").exists():
        number += 1
    return number, f"lora_{number}.safetensors"


def lora_store(
    session_id: int,
    finished_file: Path,
    *,
    expected_sha256: str,
    source: str,
    filename: str | None = None,
    training_run: TrainingRun | None = None,
    metadata: dict | None = None,
    held_to_quota: bool = False,
) -> LoraArtifact:
    """Moves a complete, fsynced LoRA file into the session folder and records it.

    Under the session lock the file is renamed into place (a fresh name: no LoRA is ever
    overwritten), then hashed: only a file whose sha256 is `expected_sha256`, the hash of
    the bytes its writer meant to write, gets its row, in the same transaction. Any
    failure removes the file, so no row ever names a missing or truncated LoRA.
    `held_to_quota`: the file must fit the session owner's stored-MB quota, checked under
    the owner's lock (taken after the session's, as image uploads take them), so that
    uploads at the same moment cannot pass it together.
    """
    with session_lock(session_id) as session:
        if held_to_quota and session.owner_id is not None:
            owner = owner_locked(session.owner_id)
            adding = finished_file.stat().st_size
            quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), adding, unit=MB)
        number, name = _allocate_lora_name(session, filename)
        folder = storage.session_dir(session.pk)
        folder.mkdir(parents=True, exist_ok=True)  # under the lock: the session still exists
        target = folder / name
        try:
            replace_with_retry(finished_file, target)
        except OSError as error:
            raise ServiceError(
                f"the LoRA could not be moved into place ({error.strerror or error}); "
                "nothing was stored",
                status=500,
            ) from None
        try:
            sha256 = sha256_file(target)
            if sha256 != expected_sha256:
                raise ServiceError(
                    f"{name} does not hold the bytes that were written (sha256 mismatch: "
                    "truncated or altered on disk); nothing was stored",
                    status=500,
                )
            artifact = LoraArtifact.objects.create(
                session=session,
                number=number,
                filename=name,
                size=target.stat().st_size,
                sha256=sha256,
                source=source,
                training_run=training_run,
                metadata=metadata or {},
            )
            session.next_lora_number = number + 1
            session.save(update_fields=["next_lora_number"])
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    return artifact


def lora_upload(
    session_id: int,
    data: bytes,
    filename: str | None,
    field: str = "lora_base64",
    caller: Caller | None = None,
) -> LoraArtifact:
    """Stores an uploaded LoRA in the canonical (diffusers) form the trainer writes, after
    checking it is an SDXL LoRA (or LoCon) for the model.

    diffusers, PEFT and kohya (sd-scripts, LyCORIS LoCon) files are accepted, on any Linear
    or Conv2d module of the Base UNet and both text encoders; one already canonical is
    stored byte for byte, any other is converted (alphas folded into the weights, so it
    computes the same). LoHa, LoKr, DoRA, IA3 and other adapters are refused by name. The
    bytes are read as safetensors (a header and raw numbers), never unpickled. They are
    staged outside the session folder, so a session deleted meanwhile gets no file.

    The file must first be one the safetensors library reads, laid out as its format
    requires (lora_files.read_lora_header: bounded header, no overlaps, gaps or trailing
    bytes), with at most MAX_UPLOAD_METADATA_BYTES of `__metadata__`; every refusal is a
    400 naming the problem, and nothing is stored.
    """
    from sdxl_engine.lora_files import inspect_lora_file

    if filename is not None and not _LORA_FILENAME.fullmatch(filename):
        raise ServiceError(
            "filename must be a plain file name ending in .safetensors "
            "(letters, digits, '.', '_' and '-')"
        )
    session = session_get(session_id, caller)
    held_to_quota = caller is not None and session.owner_id is not None
    if held_to_quota:
        # Refused before the conversion's work when it cannot fit; lora_store checks again
        # under the owner's lock, for uploads at the same moment.
        owner = Owner.objects.get(pk=session.owner_id)
        quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), len(data), unit=MB)
    upload = storage.staging_path("upload.safetensors")
    converted = storage.staging_path("converted.safetensors")
    try:
        storage.atomic_write_bytes(upload, data)
        try:
            _check_metadata_size(inspect_lora_file(upload).metadata, field)
            finished, metadata = _canonical_lora_for_the_model(upload, converted)
        except EngineError as error:
            raise ServiceError(f"{field} is not a usable LoRA file: {error}") from None
        return lora_store(
            session.pk,
            finished,
            # What must land in the session folder: the bytes sent, or our conversion.
            expected_sha256=(
                storage.sha256_bytes(data) if finished == upload else sha256_file(finished)
            ),
            source=LoraArtifact.Source.UPLOADED,
            filename=filename,
            metadata=metadata,
            held_to_quota=held_to_quota,
        )
    finally:
        upload.unlink(missing_ok=True)
        converted.unlink(missing_ok=True)


def _check_metadata_size(metadata: dict[str, str], field: str) -> None:
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > MAX_UPLOAD_METADATA_BYTES:
        raise ServiceError(
            f"{field} is not a usable LoRA file: its __metadata__ is {size:,} bytes of JSON; "
            f"a LoRA's may hold at most {MAX_UPLOAD_METADATA_BYTES // 1024} KB"
        )


def lora_readable(lora: LoraArtifact | TrainingCheckpoint) -> None:
    """Refuses (409) a stored LoRA file that is no well-formed safetensors file, as its
    upload would be refused now (lora_files.read_lora_header): one stored before uploads
    were checked this way. Read before a generation is queued, so that the worker, which
    could not load it, never gets it; only the header is read."""
    from sdxl_engine.lora_files import read_lora_header

    path = lora_file_path(lora)
    if not path.is_file():
        return  # deleted meanwhile: the worker says so, as for one pruned once queued
    try:
        read_lora_header(path)
    except EngineError as error:
        raise ServiceError(
            f"{error} It was stored before uploads were checked this way and cannot be "
            "applied (bin/manage verify lists such files).",
            status=409,
        ) from None


def _canonical_lora_for_the_model(upload: Path, converted: Path) -> tuple[Path, dict]:
    """The upload in canonical form (itself, or converted into `converted`) and its
    metadata, checked against each Base model the configured worker may load (it fits if
    it fits one); against the LoRA's own consistency only when the web process cannot
    know the model. Raises the first model's EngineError when it fits none.

    A kohya file in sd-scripts' SDXL block numbering converts according to the UNet's
    layers per block, so it is converted for each model in turn.
    """
    from sdxl_engine.lora_files import check_lora, read_lora_metadata
    from sdxl_engine.lora_formats import canonical_lora_file, is_canonical

    canonical = is_canonical(upload)
    first_error, converted_for = None, object()
    for layers_per_block, shapes in _worker_models():
        try:
            if canonical:
                finished, metadata = upload, read_lora_metadata(upload)
            else:
                if converted_for != layers_per_block:
                    converted_for = None  # until the conversion below succeeds
                    metadata = canonical_lora_file(upload, converted, layers_per_block)
                    converted_for = layers_per_block
                finished = converted
            check_lora(finished, shapes)
            return finished, metadata
        except EngineError as error:
            first_error = first_error or error
    raise first_error


def model_lora_target_shapes() -> "list[TargetShapes | None]":
    """The module shapes (lora_files.lora_target_shapes) of each Base model the configured
    worker may load; [None] when the web process cannot know them (a LoRA is then checked
    for its own consistency only)."""
    return [shapes for _, shapes in _worker_models()]


def _worker_models() -> "list[tuple[int | None, TargetShapes | None]]":
    """Each Base model the configured worker may load, as (its UNet's layers per block,
    its module shapes); SDXL's layers and no shapes when the web process cannot know it."""
    from sdxl_engine.lora_files import lora_target_shapes
    from sdxl_engine.lora_formats import SDXL_LAYERS_PER_BLOCK
    from sdxl_engine.source import base_lora_configs

    return [
        (_layers_per_block(configs["unet"]), lora_target_shapes(**_by_argument(configs)))
        for configs in base_lora_configs(settings.SDXL_MODEL_PRESET, settings.SDXL_BASE_MODEL)
    ] or [(SDXL_LAYERS_PER_BLOCK, None)]


def _by_argument(configs: dict) -> dict:
    return {
        "unet_config": configs["unet"],
        "text_encoder_config": configs["text_encoder"],
        "text_encoder_2_config": configs["text_encoder_2"],
    }


def _layers_per_block(unet_config: dict) -> int | None:
    """The UNet's resnets per down block when every block has as many (None otherwise)."""
    value = unet_config.get("layers_per_block", 2)
    if isinstance(value, list | tuple):
        return value[0] if len(set(value)) == 1 else None
    return value


def lora_file_path(lora: LoraArtifact | TrainingCheckpoint) -> Path:
    """Where a LoRA file of the session lies: the folder's root, or checkpoints/."""
    if isinstance(lora, TrainingCheckpoint):
        return checkpoint_path(lora)
    return storage.session_dir(lora.session_id) / lora.filename


def lora_read(
    artifact: LoraArtifact | TrainingCheckpoint, lora_format: str = LORA_FORMATS[0]
) -> bytes:
    """The file's bytes, or with `lora_format="kohya"` the same adapter in kohya's form (the
    bytes GET /sessions/<id>/loras/<file>?format=kohya sends: see lora_download).

    Either way the file is read whole in one go: a concurrent replace swaps the name, not
    these bytes.
    """
    download = lora_download(artifact, lora_format)
    with download.handle:
        return download.handle.read()


def _kohya_bytes(artifact: LoraArtifact | TrainingCheckpoint) -> bytes:
    """The file converted to kohya's form (not byte for byte the same twice: safetensors
    writes the metadata in no fixed order)."""
    from sdxl_engine.lora_formats import kohya_lora_bytes

    path = lora_file_path(artifact)
    if not path.is_file():
        raise _missing(artifact)
    try:
        return kohya_lora_bytes(path, base_model=settings.SDXL_BASE_MODEL)
    except FileNotFoundError:
        raise _missing(artifact) from None
    except EngineError as error:
        raise ServiceError(
            f"{artifact.filename} cannot be converted to kohya format: {error}", status=409
        ) from None


def _missing(artifact: LoraArtifact | TrainingCheckpoint) -> ServiceError:
    return ServiceError(
        f"{artifact.filename} is recorded but missing from the session folder", status=404
    )


# Where kohya forms of a session's LoRA files are kept once converted: hidden in the session
# folder, so they leave with the session, and export, verify and the LoRA listings skip them.
KOHYA_CACHE_FOLDER = ".kohya"
_KOHYA_CACHED = re.compile(r"^([0-9a-f]{64})\.([0-9a-f]{64})\.safetensors$")


@dataclass
class LoraDownload:
    """A LoRA file opened for sending: `handle` (the caller closes it) holds `size` bytes
    whose sha256 is `sha256`; `filename` is the name to save it as."""

    handle: BinaryIO
    size: int
    sha256: str
    filename: str


def download_filename(artifact: LoraArtifact | TrainingCheckpoint, lora_format: str) -> str:
    """The stored name, `<stem>.kohya.safetensors` for the kohya form."""
    if lora_format == LORA_FORMATS[0]:
        return artifact.filename
    return artifact.filename.removesuffix(".safetensors") + f".{lora_format}.safetensors"


def lora_download(
    artifact: LoraArtifact | TrainingCheckpoint, lora_format: str = LORA_FORMATS[0]
) -> LoraDownload:
    """The file to send for GET /sessions/<id>/loras/<file>, opened (a concurrent prune
    or replace then swaps names, not these bytes).

    The stored form is the file itself, its sha256 the row's. The kohya form is converted
    once and kept in the session folder's `.kohya/` under
    `<stored sha256>.<kohya sha256>.safetensors` (written atomically): a resumed download
    (ranges) and every later one read that file instead of converting again, and its name
    says what it was made from, so a changed file is never answered from a stale copy.
    When it cannot be kept (the session folder is being deleted, the disk is full) the
    conversion is sent from memory.
    """
    filename = download_filename(artifact, lora_format)
    if lora_format == LORA_FORMATS[0]:
        path = lora_file_path(artifact)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise _missing(artifact) from None
        return LoraDownload(handle, os.fstat(handle.fileno()).st_size, artifact.sha256, filename)
    cache = storage.session_dir(artifact.session_id) / KOHYA_CACHE_FOLDER
    for cached in _kohya_cached(cache, artifact.sha256):
        try:
            handle = cached.open("rb")
        except FileNotFoundError:
            continue  # pruned meanwhile
        sha256 = _KOHYA_CACHED.fullmatch(cached.name)[2]  # type: ignore[index]
        return LoraDownload(handle, os.fstat(handle.fileno()).st_size, sha256, filename)
    data = _kohya_bytes(artifact)
    sha256 = storage.sha256_bytes(data)
    try:
        # Not parents=True: a session folder deleted meanwhile must not come back.
        cache.mkdir(exist_ok=True)
        target = cache / f"{artifact.sha256}.{sha256}.safetensors"
        temp = storage.temp_path_for(target)
        try:
            temp.write_bytes(data)
            fsync_file(temp)
            replace_with_retry(temp, target)
        finally:
            temp.unlink(missing_ok=True)
    except OSError as error:
        logger.warning("kohya form of %s not cached: %s", artifact, error)
    return LoraDownload(io.BytesIO(data), len(data), sha256, filename)


def _kohya_cached(cache: Path, source_sha256: str) -> list[Path]:
    """The kohya forms kept of the file whose sha256 is `source_sha256`."""
    if not cache.is_dir():
        return []
    return sorted(
        path
        for path in cache.glob(f"{source_sha256}.*.safetensors")
        if (match := _KOHYA_CACHED.fullmatch(path.name)) and match[1] == source_sha256
    )


def loras_prune(keep: int, dry_run: bool = False, session_id: int | None = None) -> list[str]:
    """Keeps each session's newest `keep` LoRA files (or one session's) and deletes the
    rest: the newest `keep` numbered LoRAs, and the newest `keep` checkpoints of the runs
    that have ended (newest: the latest run's, its last step first).

    Numbers are never reused: the session's counter stays where it is. A checkpoint of a
    queued or running run is kept and not counted: a resumed run continues from its
    checkpoints. A run's sample images stay: they are small, and show how each run went.
    A LoRA or checkpoint that a queued or running generation is about to use, or that a
    queued or running run continues (init_lora), is kept (and not counted). The rows go
    first, the files (and their kohya forms kept for downloads) once that is committed.
    Returns the files deleted (or, with `dry_run`, that would be), as `session_<id>/<file>`
    and `session_<id>/checkpoints/<file>`.
    """
    sessions = set(LoraArtifact.objects.values_list("session_id", flat=True)) | set(
        TrainingCheckpoint.objects.values_list("session_id", flat=True)
    )
    if session_id is not None:
        sessions &= {session_id}
    pruned = []
    for sid in sorted(sessions):
        with session_lock(sid):
            doomed_loras, doomed_checkpoints = _prunable(sid, keep)
            pruned += [f"session_{sid}/{name}" for _, name, _ in doomed_loras]
            pruned += [
                f"session_{sid}/{CHECKPOINTS_FOLDER}/{name}" for _, name, _ in doomed_checkpoints
            ]
            if dry_run or not (doomed_loras or doomed_checkpoints):
                continue
            LoraArtifact.objects.filter(pk__in=[pk for pk, _, _ in doomed_loras]).delete()
            TrainingCheckpoint.objects.filter(
                pk__in=[pk for pk, _, _ in doomed_checkpoints]
            ).delete()
            # The rows go first, the files once that is committed: a failure keeps both.
            folder = storage.session_dir(sid)
            paths = [folder / name for _, name, _ in doomed_loras] + [
                folder / CHECKPOINTS_FOLDER / name for _, name, _ in doomed_checkpoints
            ]
            # The kohya forms of files no row of the session holds any more.
            still_held = set(
                LoraArtifact.objects.filter(session_id=sid).values_list("sha256", flat=True)
            ) | set(
                TrainingCheckpoint.objects.filter(session_id=sid).values_list("sha256", flat=True)
            )
            doomed_sha256s = {sha256 for _, _, sha256 in doomed_loras + doomed_checkpoints}
            for sha256 in doomed_sha256s - still_held:
                paths += _kohya_cached(folder / KOHYA_CACHE_FOLDER, sha256)
            transaction.on_commit(lambda paths=paths: _unlink_all(paths))
    return pruned


# A file prune_loras removes: its row's pk, its file name, its sha256.
_Doomed = tuple[int, str, str]


def _prunable(session_id: int, keep: int) -> tuple[list[_Doomed], list[_Doomed]]:
    """The session's LoRAs and checkpoints that prune_loras removes, each oldest first."""
    in_use = GenerationLora.objects.filter(
        generation__status__in=[Generation.Status.QUEUED, Generation.Status.RUNNING]
    )
    loras_in_use = set(in_use.filter(lora__isnull=False).values_list("lora_id", flat=True))
    checkpoints_in_use = set(
        in_use.filter(checkpoint__isnull=False).values_list("checkpoint_id", flat=True)
    )
    # The files a queued or running run continues (init_lora): it loads them when it starts.
    parents = {
        init_lora["lora_filename"]
        for init_lora in TrainingRun.objects.filter(
            session_id=session_id,
            status__in=TrainingRun.ACTIVE_STATUSES,
            init_lora__isnull=False,
        ).values_list("init_lora", flat=True)
    }
    loras = [
        (pk, name, sha256)
        for pk, name, sha256 in LoraArtifact.objects.filter(session_id=session_id)
        .order_by("-number")[keep:]
        .values_list("pk", "filename", "sha256")
        if pk not in loras_in_use and name not in parents
    ]
    checkpoints = [
        (pk, name, sha256)
        for pk, name, sha256 in TrainingCheckpoint.objects.filter(session_id=session_id)
        # Any end a run comes to: only a queued or running run may resume from them.
        .exclude(run__status__in=TrainingRun.ACTIVE_STATUSES)
        .order_by("-run_id", "-step")[keep:]
        .values_list("pk", "filename", "sha256")
        if pk not in checkpoints_in_use and name not in parents
    ]
    return loras, checkpoints[::-1]


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
