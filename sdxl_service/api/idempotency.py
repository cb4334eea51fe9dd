"""The `Idempotency-Key` request header (docs/api.md), honoured by every endpoint that does
something: a retry with the same key answers the first answer and does nothing again.
What a key means is access_app.idempotency's; this module reads the header and the request,
and keeps or replays the answer.

A view takes the header by being decorated `@honours_idempotency_key` (above its
`@extend_schema`); /api/schema then lists the header and its 409 and 422 on that operation
(schema.ScopedAutoSchema).
"""

import hashlib
import json
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.core.files.uploadedfile import UploadedFile
from django.http import QueryDict
from django.http.response import HttpResponseBase
from drf_spectacular.utils import OpenApiParameter
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.views import APIView

from access_app.callers import request_caller
from access_app.idempotency import (
    StoredAnswer,
    idempotency_key_claim,
    idempotency_key_keep,
    idempotency_key_release,
)
from access_app.selectors import caller_owner_id
from core.errors import ServiceError

HEADER = "Idempotency-Key"
# Set on an answer replayed from a key (Stripe's name).
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
# What marks a view that honours the header (the schema reads it from the view).
VIEW_FLAG = "honours_idempotency_key"

IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    HEADER,
    {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
    OpenApiParameter.HEADER,
    description=(
        "A key of your choosing (a UUID), at most 255 characters, unique per request you "
        "mean: a retry with the same key and the same request (endpoint and parameters) is "
        "answered the first success again, with `Idempotent-Replayed: true`, and does "
        "nothing again (no second job). A failed request keeps nothing: its retry runs. "
        "The same key on another request: 422; while its first request is still being "
        "answered: 409. Keys are kept SDXL_IDEMPOTENCY_KEY_HOURS (24 h), per owner."
    ),
    required=False,
)

ViewT = TypeVar("ViewT", bound=Callable[..., HttpResponseBase])
Handler = Callable[..., HttpResponseBase]


def honours_idempotency_key(view: ViewT) -> ViewT:
    """Decorates an `@api_view` view (put it above `@extend_schema`): each of its handlers
    honours the Idempotency-Key header."""
    view_class: type[APIView] = view.cls  # type: ignore[attr-defined]  # set by @api_view
    for method in view_class.http_method_names:
        handler = view_class.__dict__.get(method)
        if handler is not None and method != "options":
            setattr(view_class, method, _honouring_the_key(handler))
    setattr(view_class, VIEW_FLAG, True)
    return view


def _honouring_the_key(handler: Handler) -> Handler:
    @wraps(handler)
    def handle(view: APIView, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:
        key = request.headers.get(HEADER)
        if key is None:
            return handler(view, request, *args, **kwargs)
        if not key or len(key) > MAX_KEY_CHARS:
            raise ServiceError(f"{HEADER}: give 1 to {MAX_KEY_CHARS} characters")
        owner_id = caller_owner_id(request_caller(request))
        claim = idempotency_key_claim(owner_id, key, request_fingerprint(request))
        if isinstance(claim, StoredAnswer):
            return _replayed(claim)
        try:
            response = handler(view, request, *args, **kwargs)
        except BaseException:
            idempotency_key_release(claim)
            raise
        data = getattr(response, "data", None)
        if 200 <= response.status_code < 300 and data is not None:
            idempotency_key_keep(claim, response.status_code, json.dumps(data, cls=JSONEncoder))
        else:
            idempotency_key_release(claim)
        return response

    return handle


def _replayed(answer: StoredAnswer) -> Response:
    """The kept answer, rendered as the first was (the same renderer, the same data)."""
    response = Response(json.loads(answer.body), status=answer.status)
    response[REPLAYED_HEADER] = "true"
    return response


def request_fingerprint(request: Request) -> str:
    """sha256 of what makes a request the same request: its method, its endpoint (a
    trailing slash is the same endpoint: api.urls), its query and its body's parameters
    (JSON by value, whatever the key order or spacing; a form's fields and its files'
    contents, whatever the multipart boundary)."""
    described = {
        "method": request.method,
        "endpoint": request.path.rstrip("/"),
        "query": sorted(request.query_params.lists()),
        "body": _comparable(request.data),
    }
    encoded = json.dumps(described, sort_keys=True, cls=JSONEncoder).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _comparable(data: Any) -> Any:
    if isinstance(data, QueryDict):
        return {key: [_comparable(value) for value in values] for key, values in data.lists()}
    if isinstance(data, UploadedFile):
        digest = hashlib.sha256()
        for chunk in data.chunks():
            digest.update(chunk)
        data.seek(0)  # the view reads it next
        return {"file": data.name, "sha256": digest.hexdigest()}
    return data
