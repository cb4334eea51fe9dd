"""The API's request parsers, and the limit on uploaded files."""

from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadhandler import FileUploadHandler
from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser, with JSON nested too deep for Python's parser answering 400.

    `[[[[...]]]]` a few thousand levels deep raises RecursionError, which DRF does not take
    for a parse error (it catches ValueError), so the request would end in a 500.
    """

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None


class UploadLimitHandler(FileUploadHandler):
    """Refuses a multipart body larger than SDXL_MAX_UPLOAD_MB (413) before its files are
    stored: by its Content-Length, and by counting for a body sent without one (chunked).

    Django's DATA_UPLOAD_MAX_MEMORY_SIZE (SDXL_MAX_BODY_MB) leaves file parts out; this is
    the limit for them. It passes every chunk on to the handlers after it.
    """

    def handle_raw_input(
        self,
        input_data: IO[bytes],
        META: dict[str, str],
        content_length: int,
        boundary: str,
        encoding: str | None = None,
    ) -> None:
        self.received = 0
        if content_length and content_length > self._limit():
            raise self._too_big()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received = max(self.received, start + len(raw_data))
        if self.received > self._limit():
            raise self._too_big()
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None

    @staticmethod
    def _limit() -> int:
        limit: int = settings.SDXL_MAX_UPLOAD_MB * 1024 * 1024
        return limit

    @staticmethod
    def _too_big() -> "UploadTooBig":
        return UploadTooBig(
            f"uploaded files are larger than the limit of {settings.SDXL_MAX_UPLOAD_MB} MB "
            "(SDXL_MAX_UPLOAD_MB)"
        )


class UploadTooBig(RequestDataTooBig):
    """A multipart body over SDXL_MAX_UPLOAD_MB; its message says so (413)."""
