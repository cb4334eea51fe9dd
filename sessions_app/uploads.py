"""Training images sent as files (multipart/form-data): several at once with their
captions (and masks), or a zip of images with a `.txt` caption and a `<name>_mask.png`
mask beside each, as kohya-style datasets are laid out.

A zip is read in memory, never extracted: member names only pair images with captions and
masks, and the files are written under the service's own names (`<group>/0.<ext>`). Every member is
still checked, so an archive that would be dangerous to unpack anywhere is refused whole.
"""

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings

from core.errors import ServiceError
from sdxl_engine.dataset import MASK_SUFFIX, is_mask_path
from sessions_app import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSION = ".txt"
# Members one zip may hold; more is no training set this service can use.
MAX_ZIP_MEMBERS = 2000
# Folders and files zip tools add beside the content (macOS resource forks, Finder data).
_TOOL_LITTER = ("__MACOSX/",)


@dataclass(frozen=True)
class UploadedImage:
    name: str  # as sent: the form's file name, or the path inside the zip
    data: bytes
    caption: str
    mask: bytes | None = None  # its mask as sent (images.checked_mask), if any
    mask_name: str = "mask"  # how a refusal names the mask: its field, file or member


def max_upload_bytes() -> int:
    megabytes: int = settings.SDXL_MAX_UPLOAD_MB
    return megabytes * 1024 * 1024


def images_from_zip(data: bytes, archive_name: str = "archive") -> list[UploadedImage]:
    """The zip's images, each with the caption of the `.txt` of the same name beside it
    (an empty caption without one) and the mask `<name>_mask.<ext>` beside it if there is
    one (sdxl_engine.dataset.is_mask_path: a mask is never an image of its own), ordered
    by name.

    Refused (400), before anything is written: a file that is no zip, absolute paths,
    `..`, links, more than MAX_ZIP_MEMBERS members, more uncompressed bytes than
    SDXL_MAX_UPLOAD_MB (declared or found while reading: a zip bomb), files that are no
    image or caption, a caption or a mask without its image, and two masks of one image.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ServiceError(f"{archive_name} is not a zip file") from None
    with archive:
        members = _checked_members(archive, archive_name)
        limit = max_upload_bytes()
        if sum(info.file_size for info in members) > limit:
            raise _too_large(archive_name, limit)
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        masks: dict[str, tuple[str, bytes]] = {}  # by their image's stem: (name, bytes)
        read = 0
        for info in members:
            content = _read_member(archive, info, archive_name)
            read += len(content)
            if read > limit:
                raise _too_large(archive_name, limit)
            stem, extension = _split(info.filename)
            if extension in IMAGE_EXTENSIONS and is_mask_path(Path(info.filename)):
                image_stem = stem.removesuffix(MASK_SUFFIX)
                if image_stem in masks:
                    raise ServiceError(
                        f"{archive_name} holds two masks of {image_stem}: "
                        f"{masks[image_stem][0]!r} and {info.filename!r}"
                    )
                masks[image_stem] = (info.filename, content)
            elif extension in IMAGE_EXTENSIONS:
                images[info.filename] = content
            elif extension == CAPTION_EXTENSION:
                captions[stem] = _caption(content, f"{archive_name}: {info.filename}")
            else:
                raise ServiceError(
                    f"{archive_name} holds {info.filename!r}, which is no image "
                    f"({', '.join(IMAGE_EXTENSIONS)}) or caption (.txt)"
                )
    stems = {_split(name)[0] for name in images}
    orphans = sorted(stem + CAPTION_EXTENSION for stem in captions if stem not in stems)
    if orphans:
        raise ServiceError(f"{archive_name} holds captions without their image: {orphans[:3]}")
    lone_masks = sorted(name for stem, (name, _) in masks.items() if stem not in stems)
    if lone_masks:
        raise ServiceError(
            f"{archive_name} holds masks without their image (<name>_mask.png beside "
            f"<name>.<ext>): {lone_masks[:3]}"
        )
    if not images:
        raise ServiceError(f"{archive_name} holds no image")
    uploads = []
    for name, content in sorted(images.items()):
        stem = _split(name)[0]
        mask_name, mask = masks.get(stem, ("", None))
        uploads.append(
            UploadedImage(
                name,
                content,
                captions.get(stem, ""),
                mask=mask,
                mask_name=f"{archive_name}: {mask_name}",
            )
        )
    return uploads


def _checked_members(archive: zipfile.ZipFile, archive_name: str) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise ServiceError(f"{archive_name} holds more than {MAX_ZIP_MEMBERS} files")
    members = []
    for info in infos:
        name = info.filename
        if not storage.is_plain_relative_name(name):
            raise ServiceError(f"{archive_name} holds an unsafe path: {name!r}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ServiceError(f"{archive_name} holds a link: {name!r}")
        if info.is_dir() or name.startswith(_TOOL_LITTER) or _hidden(name):
            continue
        members.append(info)
    return members


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, archive_name: str) -> bytes:
    """The member's bytes, never more than its header declares (a lying header is a bomb)."""
    try:
        with archive.open(info) as member:
            content = member.read(info.file_size + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as error:
        raise ServiceError(f"{archive_name}: {info.filename} cannot be read ({error})") from None
    if len(content) > info.file_size:
        raise ServiceError(f"{archive_name}: {info.filename} is larger than its header says")
    return content


def _split(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    return str(path.with_suffix("")), path.suffix.lower()


def _caption(content: bytes, name: str) -> str:
    try:
        return content.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ServiceError(f"{name} is not UTF-8 text") from None


def _too_large(archive_name: str, limit: int) -> ServiceError:
    return ServiceError(
        f"{archive_name} unpacks to more than the limit of {limit // (1024 * 1024)} MB "
        "(SDXL_MAX_UPLOAD_MB)",
        status=413,
    )
