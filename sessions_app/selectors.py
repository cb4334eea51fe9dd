"""Reads of sessions for the API and the admin.

The API passes its caller: a session of another owner then reads exactly as a missing one
(a 404 with the same message), so ids cannot be probed. `caller=None` (admin, commands)
sees everything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from django.conf import settings
from django.db.models import Count, QuerySet

from access_app.callers import Caller
from access_app.models import Owner
from access_app.selectors import caller_owner_id
from core.errors import ServiceError
from sessions_app import storage
from sessions_app.models import Session, TrainingImage


def sessions_visible(caller: Caller | None) -> QuerySet[Session]:
    """The one place that decides whose sessions a caller sees: its owner's, or every
    session for admin tokens (and the open API)."""
    if caller is None or caller.is_admin:
        return Session.objects.all()
    return Session.objects.filter(owner_id=caller_owner_id(caller))


def session_get(session_id: int, caller: Caller | None = None) -> Session:
    try:
        return sessions_visible(caller).get(pk=session_id)
    except Session.DoesNotExist:
        raise ServiceError(f"session {session_id} not found", status=404) from None


class _GroupCount(TypedDict):
    group_count: int


if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    # A session as session_list reads it: with the number of its image groups.
    SessionWithGroups = WithAnnotations[Session, _GroupCount]


def session_list(caller: Caller | None = None) -> QuerySet[SessionWithGroups]:
    return sessions_visible(caller).annotate(group_count=Count("image_groups")).order_by("id")


def training_image_get(
    session_id: int, image_id: int, caller: Caller | None = None
) -> TrainingImage:
    image = TrainingImage.objects.filter(
        pk=image_id,
        group__session_id=session_id,
        group__session__in=sessions_visible(caller),
    ).first()
    if image is None:
        raise ServiceError(f"session {session_id} has no image {image_id}", status=404)
    return image


def session_images(session_id: int) -> QuerySet[TrainingImage]:
    return (
        TrainingImage.objects.filter(group__session_id=session_id)
        .select_related("group")
        .order_by("group__number", "id")
    )


def owner_stored_bytes(owner_id: int) -> int:
    """Every byte the owner stores, measured on disk: its sessions' folders (training images,
    masks, captions, LoRA files uploaded or trained, checkpoints, sample images) and its
    generations' folders (generated images, an img2img's starting image).

    Measured rather than summed from rows: sample and generated images have no size
    column, and a walk also counts what no row knows (a file an operator dropped in), so
    the figure is the disk's and nothing has to be kept in step with it (verify/reconcile
    need no counter to repair). It costs one stat per file, under the owner's lock: 10,000
    files (an owner with ~9,000 generations) walk in ~60 ms here (2 busy cores), far
    below an upload's own cost. Hidden entries are the service's working files, gone
    when their write or run ends (a run's resume state and output before it is stored,
    `*.tmp`, what a delete moved aside): not counted."""
    session_ids = Session.objects.filter(owner_id=owner_id).values_list("pk", flat=True)
    # generation folders: training_app's generations_dir (an app above this one) names them
    generation_ids = Owner.objects.get(pk=owner_id).generations.values_list("pk", flat=True)
    folders = [storage.session_dir(pk) for pk in session_ids]
    folders += [settings.GENERATIONS_DIR / str(pk) for pk in generation_ids]
    return sum(_folder_bytes(folder) for folder in folders)


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder`, hidden entries left out; 0 when it is gone
    (a folder deleted meanwhile counts for nothing)."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    total += _folder_bytes(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += _file_bytes(entry)
    except FileNotFoundError:
        pass
    return total


def _file_bytes(entry: os.DirEntry) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:  # removed since the folder was listed
        return 0


def session_image_count(session_id: int) -> int:
    return TrainingImage.objects.filter(group__session_id=session_id).count()
