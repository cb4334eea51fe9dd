"""What the endpoints' OpenAPI descriptions share: the error shape and its meanings."""

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    """The one error shape of docs/api.md, whatever went wrong."""

    status = serializers.ChoiceField(choices=["error"])
    message = serializers.CharField(help_text="what went wrong, for a person")


_ERROR_MEANINGS = {
    400: "bad input (the message names the field)",
    404: "unknown session or LoRA",
    409: "conflicting state (already training, name taken, nothing to cancel)",
    413: "request body larger than the configured limit",
    500: "the job failed (the message says why)",
    503: "no generation worker is running",
    504: "timed out waiting for the image",
}


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """The documented error answers of an endpoint: 400 and 413 always, plus `codes`."""
    return {
        code: OpenApiResponse(ErrorSerializer, description=_ERROR_MEANINGS[code])
        for code in sorted({400, 413, *codes})
    }


def schema_without_slashed_duplicates(endpoints, **kwargs):
    """drf-spectacular preprocessing hook: `/x/` is the same endpoint as `/x` (api.urls)."""
    return [endpoint for endpoint in endpoints if not endpoint[0].endswith("/")]
