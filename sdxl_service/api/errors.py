"""The one place that turns errors into the API's JSON shape.

docs/api.md: every error answers `{"status": "error", "message": "..."}` with a fitting
4xx/5xx code; never an HTML page, never a stack trace.
"""

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from core.errors import ServiceError
from sdxl_service.api.parsers import UploadTooBig
from sdxl_service.api.schema import ErrorSerializer

logger = logging.getLogger(__name__)


def error_body(message: str) -> dict:
    """The error shape, rendered through the serializer the OpenAPI description shows."""
    return ErrorSerializer({"status": "error", "message": message}).data


def _validation_message(detail, prefix: str = "") -> str:
    """Flattens DRF's nested validation detail into one line that names the field."""
    if isinstance(detail, dict):
        parts = []
        for field, value in detail.items():
            if field == "non_field_errors":
                # A nested serializer's own errors belong to the field that holds it.
                name = prefix.rstrip(".")
            elif isinstance(field, int):  # an item of a list field: loras[1]
                name = f"{prefix.rstrip('.')}[{field}]"
            else:
                name = f"{prefix}{field}"
            parts.append(_validation_message(value, f"{name}." if name else ""))
        return "; ".join(parts)
    if isinstance(detail, list):
        return "; ".join(_validation_message(item, prefix) for item in detail)
    field = prefix.rstrip(".")
    return f"{field}: {detail}" if field else str(detail)


def api_exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every exception a view raises becomes the JSON error shape."""
    if isinstance(exc, ServiceError):
        response = Response(error_body(exc.message), status=exc.status)
        if exc.retry_after is not None:
            response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, UploadTooBig):
        return Response(error_body(str(exc)), status=413)
    if isinstance(exc, RequestDataTooBig):
        limit_mb = settings.DATA_UPLOAD_MAX_MEMORY_SIZE / (1024 * 1024)
        return Response(
            error_body(f"request body is larger than the limit of {limit_mb:g} MB"), status=413
        )
    if isinstance(exc, drf_exceptions.ValidationError):
        return Response(error_body(_validation_message(exc.detail)), status=400)
    if isinstance(exc, drf_exceptions.ParseError):
        request = context.get("request")
        if request is not None and request.content_type.startswith("multipart/"):
            return Response(error_body(f"request body could not be read: {exc.detail}"), 400)
        return Response(error_body(f"request body is not valid JSON: {exc.detail}"), status=400)
    if isinstance(exc, drf_exceptions.APIException):
        response = Response(error_body(str(exc.detail)), status=exc.status_code)
        # Set by DRF on 401s: says which credentials to send (RFC 9110).
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header
        return response
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
    return Response(error_body("internal server error"), status=500)


def json_not_found(request, exception=None):
    return JsonResponse(error_body(f"no such endpoint: {request.path}"), status=404)


def json_server_error(request):
    return JsonResponse(error_body("internal server error"), status=500)


def json_bad_request(request, exception=None):
    return JsonResponse(error_body("bad request"), status=400)
