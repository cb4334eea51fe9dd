"""The one exception the client raises for an answer the API gave as an error."""

import re

import httpx

# The API names the field first: "steps: Ensure this value is less than ...",
# "loras[1].scale: ...". A message without one ("session 7 not found") names none.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class SDXLError(Exception):
    """An error answer of the API: its HTTP status, message, the field it names, and
    Retry-After in seconds when the server sent one (429, 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> "SDXLError":
        try:
            body = response.json()
            message = str(body.get("message") or body.get("detail") or body)
        except (ValueError, AttributeError):
            message = response.text.strip() or response.reason_phrase
        match = _FIELD_PREFIX.match(message)
        retry_after: float | None = None
        try:
            retry_after = float(response.headers["Retry-After"])
        except (KeyError, ValueError):
            pass
        return cls(response.status_code, message, match.group(1) if match else None, retry_after)
