"""What can be done to sessions and their training images."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypedDict

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone
from PIL import Image

from access_app.callers import OPEN_CALLER, Caller
from access_app.models import Owner
from access_app.quotas import MB, owner_locked, quota_check
from access_app.selectors import caller_owner_id, owner_stored_bytes
from access_app.services import owner_named
from core.errors import ServiceError
from sdxl_engine.dataset import mask_path_for
from sessions_app import storage
from sessions_app.captioner import captioner_model, captions_generate
from sessions_app.images import (
    CheckedImage,
    check_image,
    check_total_pixels,
    checked_mask,
    mask_png,
    open_mask,
    stored_upright_size,
)
from sessions_app.locking import session_lock
from sessions_app.models import ImageGroup, Session, TrainingImage
from sessions_app.selectors import (
    session_get,
    session_image_count,
    session_images,
    training_image_get,
)
from sessions_app.uploads import UploadedImage, images_from_zip

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

logger = logging.getLogger(__name__)

# An uploaded image's caption that asks the captioning model to write it.
AUTO_CAPTION = "auto"


def session_create(caller: Caller | None = None, owner_id: int | None = None) -> Session:
    """A new empty session of `owner_id`, else of the caller's owner (the default owner
    without either). An API caller is held to its owner's session quota."""
    with transaction.atomic():
        if owner_id is None:
            owner_id = caller_owner_id(caller or OPEN_CALLER)
        if caller is not None:
            owner = owner_locked(owner_id)
            quota_check(owner, "max_sessions", Session.objects.filter(owner=owner).count())
        session = Session.objects.create(owner_id=owner_id)
        # In the transaction: a folder that cannot be made (no space left) leaves no row.
        storage.session_dir(session.pk).mkdir(parents=True, exist_ok=True)
    return session


def _free_group_number(session: Session) -> int:
    """The next group number, past any numbered folder an operator dropped in by hand."""
    folder = storage.session_dir(session.pk)
    numbers_on_disk = (
        [int(child.name) for child in folder.iterdir() if child.is_dir() and child.name.isdigit()]
        if folder.exists()
        else []
    )
    return max([session.next_group_number, *(n + 1 for n in numbers_on_disk)])


def session_image_add(
    session_id: int,
    image_bytes: bytes,
    caption: str,
    caller: Caller | None = None,
    mask_bytes: bytes | None = None,
) -> TrainingImage:
    """Stores one image and its caption as a new group folder `<n>/0.<ext>` + `<n>/0.txt`,
    with its mask as `<n>/0_mask.png` when one is given."""
    upload = UploadedImage("image_base64", image_bytes, caption, mask_bytes, "mask_base64")
    (image,) = session_images_add(session_id, [upload], caller)
    return image


def session_images_add(
    session_id: int, uploads: list[UploadedImage], caller: Caller | None = None
) -> list[TrainingImage]:
    """Stores each image with its caption (and its mask, if it has one) as a new group
    folder, in order: all of them or, if any fails, none (every image and mask is checked
    before anything is written or locked). An API caller must see the session, and its
    owner's quotas must hold the images and masks."""
    if caller is not None:
        session_get(session_id, caller)
    check_total_pixels(
        [(upload.name, upload.data) for upload in uploads]
        + [(upload.mask_name, upload.mask) for upload in uploads if upload.mask is not None]
    )
    checked = _auto_captions_filled([_upload_checked(upload) for upload in uploads])
    images = []
    with session_lock(session_id) as session:
        if caller is not None and session.owner_id is not None:
            _check_image_quotas(session.owner_id, session.pk, checked)
        number = _free_group_number(session)
        written = []
        try:
            for upload in checked:
                group_dir = storage.session_dir(session.pk) / str(number)
                group_dir.mkdir(parents=True)
                written.append(group_dir)
                images.append(_group_create(session, number, group_dir, upload))
                number += 1
            session.next_group_number = number
            session.save(update_fields=["next_group_number"])
        except BaseException:
            # The transaction rolls the rows back; the folders go with them.
            for group_dir in written:
                storage.remove_tree(group_dir)
            raise
    return images


class _CheckedUpload(NamedTuple):
    image: CheckedImage
    caption: str
    mask_png: bytes | None  # as stored (images.mask_png), if the image has a mask


def _upload_checked(upload: UploadedImage) -> _CheckedUpload:
    image = check_image(upload.data, field=upload.name)
    mask = (
        None
        if upload.mask is None
        else checked_mask(upload.mask, *image.upright_size, field=upload.mask_name)
    )
    return _CheckedUpload(image, caption_cleaned(upload.caption), mask)


def _auto_captions_filled(checked: list[_CheckedUpload]) -> list[_CheckedUpload]:
    """The checked uploads with each caption AUTO_CAPTION replaced by the captioning
    model's (sessions_app.captioner), before anything is stored: an upload the model
    cannot caption stores nothing, and "auto" is never stored as a caption."""
    wanted = [index for index, upload in enumerate(checked) if upload.caption == AUTO_CAPTION]
    if not wanted:
        return checked
    captions = captions_generate([checked[index].image.data for index in wanted])
    filled = list(checked)
    for index, caption in zip(wanted, captions, strict=True):
        filled[index] = checked[index]._replace(caption=caption_cleaned(caption))
    return filled


def caption_cleaned(caption: str) -> str:
    """A caption as stored, whichever way it came (JSON, multipart, a zip's .txt, PATCH,
    the admin): without the whitespace and trailing newlines around it."""
    return caption.strip()


def _caption_checked(caption: str) -> str:
    caption = caption_cleaned(caption)
    limit: int = settings.SDXL_MAX_PROMPT_CHARS
    if len(caption) > limit:
        raise ServiceError(f"caption: at most {limit} characters (SDXL_MAX_PROMPT_CHARS)")
    return caption


def training_refusal(session: Session) -> ServiceError | None:
    """Why the session's images cannot change now: a queued or running training run reads
    them (a 409 naming the run), else None."""
    run_id = (
        session.training_runs.filter(status__in=("queued", "running"))
        .order_by("pk")
        .values_list("pk", flat=True)
        .first()
    )
    if run_id is None:
        return None
    return ServiceError(
        f"session {session.pk} is training (run {run_id}): its images cannot change until "
        "the run ends or is cancelled (/cancel_training)",
        status=409,
    )


def _locked_image(session: Session, image_id: int) -> TrainingImage:
    """The session's image `image_id`, under the session lock, once no run is training."""
    refuse_while_training(session)
    image = (
        TrainingImage.objects.filter(pk=image_id, group__session=session)
        .select_related("group")
        .first()
    )
    if image is None:
        raise ServiceError(f"session {session.pk} has no image {image_id}", status=404)
    return image


def training_image_caption_set(
    session_id: int, image_id: int, caption: str, caller: Caller | None = None
) -> TrainingImage:
    """Rewrites the image's caption file (`<k>.txt` beside `<k>.<ext>`, atomically) and its
    row, trimmed as uploads are. Refused (409) while a run of the session is queued or
    running; an API caller must see the image (404 otherwise)."""
    if caller is not None:
        training_image_get(session_id, image_id, caller)
    caption = _caption_checked(caption)
    with session_lock(session_id) as session:
        image = _locked_image(session, image_id)
        _caption_write(image, caption)
    logger.info("session %s: caption of image %s rewritten", session_id, image_id)
    return image


def _caption_path(image: TrainingImage) -> Path:
    return storage.absolute_path(image.file).with_suffix(".txt")


def _caption_write(image: TrainingImage, caption: str) -> None:
    """The image's caption file (`<k>.txt` beside `<k>.<ext>`, atomically), then its row."""
    storage.atomic_write_bytes(_caption_path(image), caption.encode("utf-8"))
    image.caption = caption
    image.save(update_fields=["caption"])


class CaptionWritten(TypedDict):
    image_id: int
    caption: str
    written: bool


class CaptionsWritten(TypedDict):
    captioned: int
    skipped: int
    images: list[CaptionWritten]


def session_captions_create(
    session_id: int, overwrite: bool = False, prefix: str = "", caller: Caller | None = None
) -> CaptionsWritten:
    """Captions the session's images with the captioning model (sessions_app.captioner),
    each after `prefix`: those whose caption is empty, or all of them with `overwrite`.
    The model runs outside the session lock (minutes, for many photos on a CPU); the
    captions are then written under it, files and rows, all or none. An image whose
    caption was filled in the meantime keeps it (unless `overwrite`); one deleted in the
    meantime is left out; one the model gave no words keeps its own. Answers every image
    of the session, in order, with its caption and whether it was written. Refused (409)
    while a run of the session is queued or running, and without a captioning model; an
    API caller must see the session (404 otherwise)."""
    if caller is not None:
        session_get(session_id, caller)
    captioner_model()  # no model: a 409 before anything is read
    with session_lock(session_id) as session:
        refuse_while_training(session)
        targets = [image for image in session_images(session.pk) if overwrite or not image.caption]
    paths = [storage.absolute_path(image.file) for image in targets]
    captions = captions_generate(paths, prefix) if paths else []
    generated = {
        image.pk: caption_cleaned(caption) for image, caption in zip(targets, captions, strict=True)
    }
    with session_lock(session_id) as session:
        refuse_while_training(session)
        images = list(session_images(session.pk))
        replaced: list[tuple[Path, bytes | None]] = []  # caption files rewritten, as they were
        written: set[int] = set()
        try:
            for image in images:
                caption = generated.get(image.pk, "")
                if caption and (overwrite or not image.caption):
                    path = _caption_path(image)
                    replaced.append((path, path.read_bytes() if path.is_file() else None))
                    _caption_write(image, caption)
                    written.add(image.pk)
        except BaseException:
            # The transaction rolls the rows back; the files written so far go back too.
            for path, before in reversed(replaced):
                if before is None:
                    path.unlink(missing_ok=True)
                else:
                    storage.atomic_write_bytes(path, before)
            raise
    logger.info("session %s: %s captions written by the model", session_id, len(written))
    return {
        "captioned": len(written),
        "skipped": len(images) - len(written),
        "images": [
            {"image_id": image.pk, "caption": image.caption, "written": image.pk in written}
            for image in images
        ],
    }


def refuse_while_training(session: Session) -> None:
    """Raises training_refusal's 409 while a run of the session is queued or running."""
    refusal = training_refusal(session)
    if refusal is not None:
        raise refusal


def training_image_mask_store(
    session_id: int,
    image_id: int,
    mask: Image.Image,
    caller: Caller | None = None,
    field: str = "mask",
) -> TrainingImage:
    """Writes the image's mask beside it (`<k>_mask.png`: sdxl_engine.dataset.mask_path_for,
    atomically), replacing any mask it had, and records it on the row. `mask` becomes a
    greyscale PNG of the image's size as it is seen (upright by its EXIF orientation, as
    training sees it; images.mask_png: resized when only the scale
    differs; another aspect ratio, or a mask all black, is a 400 naming `field`). Refused
    (409) while a run of the session is queued or running; an API caller must see the
    image (404 otherwise), and its owner's stored-bytes quota must hold the mask."""
    if caller is not None:
        training_image_get(session_id, image_id, caller)
    with session_lock(session_id) as session:
        image = _locked_image(session, image_id)
        width, height = stored_upright_size(storage.absolute_path(image.file))
        data = mask_png(mask, width, height, field)
        if caller is not None and session.owner_id is not None:
            owner = owner_locked(session.owner_id)
            adding = len(data) - image.mask_size
            quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), adding, unit=MB)
        mask_path = mask_path_for(storage.absolute_path(image.file))
        storage.atomic_write_bytes(mask_path, data)
        image.mask_file = storage.relative_path(mask_path)
        image.mask_size = len(data)
        image.save(update_fields=["mask_file", "mask_size"])
    logger.info("session %s: mask of image %s stored", session_id, image_id)
    return image


def training_image_mask_upload(
    session_id: int, image_id: int, data: bytes, caller: Caller | None = None
) -> TrainingImage:
    """training_image_mask_store for a mask sent as bytes (`mask_base64`: PNG, JPEG, WebP
    or BMP within SDXL_MAX_UPLOAD_PIXELS, decoded before anything is locked)."""
    if caller is not None:
        training_image_get(session_id, image_id, caller)  # before decoding anything
    with open_mask(data, field="mask_base64") as mask:
        return training_image_mask_store(session_id, image_id, mask, caller, "mask_base64")


def training_image_mask_delete(
    session_id: int, image_id: int, caller: Caller | None = None
) -> TrainingImage:
    """Removes the image's mask: the row forgets it first, then the file goes (once the
    row is committed), so no row ever names a missing mask. Refused (409) while the
    session trains; 404 for an image without a mask."""
    if caller is not None:
        training_image_get(session_id, image_id, caller)
    with session_lock(session_id) as session:
        image = _locked_image(session, image_id)
        if not image.mask_file:
            raise ServiceError(f"image {image_id} has no mask", status=404)
        mask_path = storage.absolute_path(image.mask_file)
        image.mask_file, image.mask_size = "", 0
        image.save(update_fields=["mask_file", "mask_size"])
        # Once the row is saved: a failed commit leaves row and file as they were.
        transaction.on_commit(partial(storage.remove_tree, mask_path))
    logger.info("session %s: mask of image %s removed", session_id, image_id)
    return image


def training_image_delete(session_id: int, image_id: int, caller: Caller | None = None) -> None:
    """Removes one image, its caption file, its mask and its row; the other images keep
    their ids, groups and paths (nothing is renumbered, and group numbers are never
    reused). A group folder left with nothing else in it goes with its row; one that still
    holds other files (an operator's) stays. Files are renamed away first (`.deleted-*`),
    atomically, and removed once the rows are gone. Refused (409) while a run of the
    session is queued or running; an API caller must see the image (404 otherwise)."""
    if caller is not None:
        training_image_get(session_id, image_id, caller)
    with session_lock(session_id) as session:
        image = _locked_image(session, image_id)
        image_path = storage.absolute_path(image.file)
        # Its mask by name too: one left beside no image would be no one's.
        own_files = {image_path, image_path.with_suffix(".txt"), mask_path_for(image_path)}
        if image.mask_file:
            own_files.add(storage.absolute_path(image.mask_file))
        group_dir = image_path.parent
        others = [
            child
            for child in (group_dir.iterdir() if group_dir.is_dir() else [])
            if child not in own_files and not storage.is_leftover_name(child.name)
        ]
        if others or image.group.images.exclude(pk=image.pk).exists():
            image.delete()
            moved = [storage.move_aside(path) for path in sorted(own_files)]
        else:
            image.group.delete()  # and its image's row with it
            moved = [storage.move_aside(group_dir)]
        transaction.on_commit(partial(_remove_all, moved))
    logger.info("session %s: deleted image %s", session_id, image_id)


def _remove_all(paths: list[Path | None]) -> None:
    for path in paths:
        storage.remove_tree(path)


def _check_image_quotas(owner_id: int, session_id: int, uploads: list[_CheckedUpload]) -> None:
    owner = owner_locked(owner_id)
    quota_check(owner, "max_images_per_session", session_image_count(session_id), len(uploads))
    adding = sum(len(upload.image.data) + len(upload.mask_png or b"") for upload in uploads)
    quota_check(owner, "max_stored_mb", owner_stored_bytes(owner.pk), adding, unit=MB)


def session_images_upload(
    session_id: int,
    files: list[tuple[str, bytes]],
    captions: list[str],
    archive: tuple[str, bytes] | None = None,
    caller: Caller | None = None,
    masks: list[tuple[str, bytes]] | None = None,
) -> list[TrainingImage]:
    """Images sent as files: `files` (name, bytes) with one caption each, in order (no
    captions: every caption empty) and one mask (name, bytes) each (no masks: none has a
    mask), then the images of a zip `archive` with the `.txt` and `<name>_mask.png` beside
    each (uploads.images_from_zip). All stored, or none."""
    masks = masks or []
    if captions and len(captions) != len(files):
        raise ServiceError(
            f"send one caption per image ({len(files)} images, {len(captions)} captions), or none"
        )
    if masks and len(masks) != len(files):
        raise ServiceError(
            f"mask: send one mask per image, in the images' order ({len(files)} images, "
            f"{len(masks)} masks), or none"
        )
    uploads = [
        UploadedImage(
            name,
            data,
            captions[index] if captions else "",
            masks[index][1] if masks else None,
            f"mask {masks[index][0]}" if masks else "mask",
        )
        for index, (name, data) in enumerate(files)
    ]
    if archive is not None:
        uploads += images_from_zip(archive[1], archive[0])
    if not uploads:
        raise ServiceError("send at least one image (image) or a zip of images (archive)")
    return session_images_add(session_id, uploads, caller)


def _group_create(
    session: Session, number: int, group_dir: Path, upload: _CheckedUpload
) -> TrainingImage:
    checked = upload.image
    image_path = group_dir / f"0.{checked.extension}"
    storage.atomic_write_bytes(image_path, checked.data)
    storage.atomic_write_bytes(group_dir / "0.txt", upload.caption.encode("utf-8"))
    mask_file = ""
    if upload.mask_png is not None:
        mask_path = mask_path_for(image_path)
        storage.atomic_write_bytes(mask_path, upload.mask_png)
        mask_file = storage.relative_path(mask_path)
    group = ImageGroup.objects.create(session=session, number=number)
    return TrainingImage.objects.create(
        group=group,
        file=storage.relative_path(image_path),
        caption=upload.caption,
        image_format=checked.image_format,
        width=checked.width,
        height=checked.height,
        size=len(checked.data),
        sha256=storage.sha256_bytes(checked.data),
        mask_file=mask_file,
        mask_size=len(upload.mask_png or b""),
    )


def session_delete(session_id: int, caller: Caller | None = None) -> None:
    """Removes the session's rows and folder; the folder is renamed away first, atomically."""
    if caller is not None:
        session_get(session_id, caller)
    with session_lock(session_id) as session:
        session.delete()
        moved = storage.move_aside(storage.session_dir(session_id))
        transaction.on_commit(lambda: storage.remove_tree(moved))
    logger.info("deleted session %s", session_id)


class _LastActivity(TypedDict):
    last_activity: datetime


def sessions_idle_since(cutoff: datetime) -> list[WithAnnotations[Session, _LastActivity]]:
    """Sessions with nothing new (images, LoRAs, training runs) since `cutoff`, oldest first.

    A session with a queued or running training run is never idle.
    """
    sessions = (
        Session.objects.exclude(training_runs__status__in=["queued", "running"])
        .annotate(
            last_activity=Greatest(
                "created_at",
                Coalesce(Max("image_groups__created_at"), "created_at"),
                Coalesce(Max("loras__created_at"), "created_at"),
                Coalesce(Max("training_runs__created_at"), "created_at"),
            )
        )
        .filter(last_activity__lt=cutoff)
        .order_by("last_activity", "id")
    )
    return list(sessions)


def sessions_purge(
    older_than_days: float, dry_run: bool = False
) -> list[WithAnnotations[Session, _LastActivity]]:
    """Deletes every session idle for `older_than_days` (only lists them with `dry_run`)."""
    idle = sessions_idle_since(timezone.now() - timedelta(days=older_than_days))
    if not dry_run:
        for session in idle:
            session_delete(session.pk)
    return idle


class Reassigned(TypedDict):
    sessions: list[int]
    generations: int


def sessions_reassign(
    from_owner: str, to_owner: str, session_ids: list[int] | None = None, dry_run: bool = False
) -> Reassigned:
    """Gives the sessions of owner `from_owner` (all, or those of `session_ids`) to owner
    `to_owner` (created if new). Their runs, LoRA files, checkpoints and samples go with
    them (they belong to the session, not to an owner). Generations have an owner of their
    own: moving every session moves every generation of `from_owner` too; moving chosen
    sessions moves the generations that applied their LoRAs. Quotas are not checked (an
    operator's command). With `dry_run`, says what would move and moves nothing."""
    source = Owner.objects.filter(name=from_owner.strip()).first()
    if source is None:
        known = ", ".join(Owner.objects.values_list("name", flat=True)) or "none"
        raise ServiceError(f"no owner {from_owner!r} (owners: {known})", status=404)
    with transaction.atomic():
        if not to_owner.strip():
            raise ServiceError("an owner needs a name")
        # A dry run creates no owner either.
        target = (
            Owner.objects.filter(name=to_owner.strip()).first()
            if dry_run
            else owner_named(to_owner)
        )
        if target is not None and target.pk == source.pk:
            raise ServiceError(f"{from_owner!r} and {to_owner!r} are the same owner")
        sessions = Session.objects.select_for_update().filter(owner=source)
        if session_ids is not None:
            missing = sorted(set(session_ids) - set(sessions.values_list("pk", flat=True)))
            if missing:
                raise ServiceError(
                    f"owner {source.name!r} has no session {', '.join(map(str, missing))}",
                    status=404,
                )
            sessions = sessions.filter(pk__in=session_ids)
        moving = list(sessions.order_by("pk").values_list("pk", flat=True))
        # The owner's generations through Owner's reverse relation (training_app's model,
        # a layer above, is never imported here).
        generations = source.generations.all()
        if session_ids is not None:
            generations = generations.filter(session_id__in=moving)
        generation_count = generations.count()
        if not dry_run:
            Session.objects.filter(pk__in=moving).update(owner=target)
            generations.update(owner=target)
    if not dry_run:
        logger.info(
            "sessions %s and %s generations moved from owner %r to %r",
            moving,
            generation_count,
            source.name,
            to_owner.strip(),
        )
    return {"sessions": moving, "generations": generation_count}
