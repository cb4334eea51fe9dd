"""The one domain error type of the service.

Services, selectors and commands raise it; the API layer turns it into the JSON error
shape in one place (sdxl_service.api.errors), commands into a CommandError.
"""


class ServiceError(Exception):
    """A failure the caller can understand and act on; `status` is the HTTP code;
    `retry_after` the seconds after which trying again may succeed (a 429's Retry-After)."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
