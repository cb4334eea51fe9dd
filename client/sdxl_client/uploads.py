"""Uploads: which files a folder, zip or list sends, and the multipart body as a stream
whose progress is reported in bytes sent of the body's total."""

import mimetypes
import os
import tempfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .models import IMAGE_SUFFIXES

Progress = Callable[[int, int], None]
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Part:
    """One form field: a text value, or a file read from `path` when it is sent."""

    name: str
    value: str | None = None
    path: Path | None = None


def _is_mask(path: Path) -> bool:
    return path.stem.endswith("_mask")


def _mask_of(image: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = image.with_name(f"{image.stem}_mask{suffix}")
        if candidate.is_file():
            return candidate
    return None


def _caption_of(image: Path, default: str | None) -> str:
    text_file = image.with_suffix(".txt")
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8").strip()
    return default or ""


def images_of(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The images a folder holds (sorted; masks and hidden files left out) or the files
    given; a zip is sent as it is instead (see parts_for)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return sorted(
            path
            for path in Path(source).iterdir()
            if path.is_file()
            and path.suffix.lower() in IMAGE_SUFFIXES
            and not _is_mask(path)
            and not path.name.startswith(".")
        )
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    return paths


def parts_for(source: str | Path | Sequence[str | Path], caption: str | None) -> list[Part]:
    """The form's parts. A zip goes as `archive`. Images go as `image`, each with its
    `caption` (its <stem>.txt, else `caption`, else empty) and, when every image has a
    <stem>_mask.* beside it, its `mask`. When only some have masks (the multipart form
    takes one per image or none), they go as a zip built on the fly, in kohya's layout."""
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".zip"):
        if caption is not None:
            raise ValueError(
                "a zip carries its captions as <stem>.txt files; caption is for images"
            )
        return [Part("archive", path=Path(source))]
    images = images_of(source)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    masks = [_mask_of(image) for image in images]
    if any(masks) and not all(masks):
        return [Part("archive", path=_kohya_zip(images, masks, caption))]
    parts = []
    for image, mask in zip(images, masks, strict=True):
        parts.append(Part("image", path=image))
        parts.append(Part("caption", value=_caption_of(image, caption)))
        if mask is not None:
            parts.append(Part("mask", path=mask))
    return parts


def _kohya_zip(images: list[Path], masks: list[Path | None], caption: str | None) -> Path:
    """A stored (uncompressed: photos do not shrink) zip of the images, their captions and
    masks, in a temporary file the upload removes once sent."""
    handle, name = tempfile.mkstemp(suffix=".zip", prefix="sdxl-upload-")
    os.close(handle)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as archive:
        for image, mask in zip(images, masks, strict=True):
            archive.write(image, image.name)
            archive.writestr(f"{image.stem}.txt", _caption_of(image, caption))
            if mask is not None:
                archive.write(mask, mask.name)
    return Path(name)


class MultipartStream:
    """multipart/form-data of `parts`, produced in chunks as it is sent, its length known
    beforehand (Content-Length), `on_progress(sent, total)` called after each chunk."""

    def __init__(self, parts: list[Part], on_progress: Progress | None = None) -> None:
        self.parts = parts
        self.on_progress = on_progress
        self.boundary = uuid.uuid4().hex
        self.total = sum(len(self._head(part)) + self._size(part) + 2 for part in parts)
        self.total += len(self._tail())

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.total),
        }

    def _head(self, part: Part) -> bytes:
        disposition = f'form-data; name="{part.name}"'
        lines = [f"--{self.boundary}"]
        if part.path is not None:
            filename = part.path.name.replace('"', "%22")
            lines.append(f'Content-Disposition: {disposition}; filename="{filename}"')
            content_type = mimetypes.guess_type(part.path.name)[0] or "application/octet-stream"
            lines.append(f"Content-Type: {content_type}")
        else:
            lines.append(f"Content-Disposition: {disposition}")
            lines.append("Content-Type: text/plain; charset=utf-8")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    @staticmethod
    def _size(part: Part) -> int:
        if part.path is not None:
            return part.path.stat().st_size
        return len((part.value or "").encode())

    def _chunks(self) -> Iterator[bytes]:
        for part in self.parts:
            yield self._head(part)
            if part.path is not None:
                with part.path.open("rb") as file:
                    while chunk := file.read(CHUNK):
                        yield chunk
            else:
                yield (part.value or "").encode()
            yield b"\r\n"
        yield self._tail()

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self._chunks():
            sent += len(chunk)
            yield chunk
            if self.on_progress is not None:
                self.on_progress(sent, self.total)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk

    def cleanup(self) -> None:
        """Removes a zip built for this upload."""
        for part in self.parts:
            if part.path is not None and part.path.name.startswith("sdxl-upload-"):
                if part.path.parent == Path(tempfile.gettempdir()):
                    part.path.unlink(missing_ok=True)
