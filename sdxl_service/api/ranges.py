"""A file download with the HTTP caching and range rules (RFC 9110), in one place.

Django's FileResponse streams a whole file; it neither answers conditional requests nor
ranges. `download_response` adds both around an open binary file:

- `ETag` is the strong validator the caller gives (a sha256), quoted; `If-None-Match`
  naming it (or `*`) answers 304 with no body.
- `Range: bytes=<first>-<last>`, `bytes=<first>-` and `bytes=-<suffix length>` answer
  206 with `Content-Range: bytes <first>-<last>/<size>` and only those bytes; a range
  that starts past the end (or a zero suffix, or any range of an empty file) answers 416
  with `Content-Range: bytes */<size>`. A `last` past the end is cut to the end.
- As RFC 9110 allows, a Range header this module does not serve is ignored and the whole
  file answers 200: another unit than bytes, a malformed value, several ranges, and any
  range whose `If-Range` names another validator than the current ETag (the file
  changed since the client's first part).

Every answer carries `Accept-Ranges: bytes`, the ETag and the Content-Disposition.
"""

import re
from collections.abc import Iterator
from typing import BinaryIO

from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.utils.http import content_disposition_header

from sdxl_service.api.errors import error_body

CHUNK_SIZE = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Unsatisfiable(Exception):
    """The range asks for no byte of the file."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte positions a Range header asks of a `size`-byte
    file; None when the header is absent or not served (ignored: the whole file goes);
    Unsatisfiable when it is a valid range that selects nothing."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:  # another unit, several ranges, or not a range at all
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None  # "bytes=-": malformed
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # malformed: RFC 9110 says ignore it
    if first >= size:
        raise Unsatisfiable
    last = int(last_text) if last_text else size - 1
    return first, min(last, size - 1)


def _etag_listed(header: str, etag: str) -> bool:
    """Whether an If-None-Match value lists `etag` (weak comparison, as RFC 9110 wants)."""
    if header.strip() == "*":
        return True
    listed = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in listed


def _chunks(handle: BinaryIO, first: int, length: int) -> Iterator[bytes]:
    try:
        handle.seek(first)
        while length > 0:
            chunk = handle.read(min(CHUNK_SIZE, length))
            if not chunk:
                break  # the file is shorter than it was: end the body early
            length -= len(chunk)
            yield chunk
    finally:
        handle.close()


def download_response(
    request: HttpRequest,
    handle: BinaryIO,
    size: int,
    *,
    sha256: str,
    filename: str,
    content_type: str = "application/octet-stream",
) -> HttpResponseBase:
    """`handle` (open, `size` bytes, closed by the response) as an attachment named
    `filename`, with ETag `"<sha256>"`, honouring If-None-Match, Range and If-Range."""
    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": content_disposition_header(True, filename) or "attachment",
    }
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and _etag_listed(if_none_match, etag):
        handle.close()
        return HttpResponse(status=304, headers={"ETag": etag, "Accept-Ranges": "bytes"})
    wanted = None
    if_range = request.headers.get("If-Range")
    if if_range is None or if_range.strip() == etag:
        try:
            wanted = parse_range(request.headers.get("Range"), size)
        except Unsatisfiable:
            handle.close()
            return JsonResponse(
                error_body(f"the range asked for lies outside the file ({size} bytes)"),
                status=416,
                headers={
                    "ETag": etag,
                    "Accept-Ranges": "bytes",
                    "Content-Range": f"bytes */{size}",
                },
            )
    if wanted is None:
        # FileResponse writes the Content-Disposition (and Content-Length) itself.
        return FileResponse(
            handle,
            as_attachment=True,
            filename=filename,
            content_type=content_type,
            headers={"ETag": etag, "Accept-Ranges": "bytes"},
        )
    first, last = wanted
    return StreamingHttpResponse(
        _chunks(handle, first, last - first + 1),
        status=206,
        content_type=content_type,
        headers={
            **headers,
            "Content-Range": f"bytes {first}-{last}/{size}",
            "Content-Length": str(last - first + 1),
        },
    )
