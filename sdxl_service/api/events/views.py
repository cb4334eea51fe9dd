"""GET /runs/<id>/events and /generations/<id>/events as Django serves them: the OpenAPI
description, and the streams under Django's own servers (runserver, the test client),
where each stream holds its thread (and, DRF's negotiation being JSON's, needs an Accept
header that allows application/json, or none). `serve` never routes these URLs here: its web server
streams them on its event loop, without a thread (sdxl_service.event_streams)."""

from collections.abc import Callable
from typing import Any, TypeVar

from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, permission_classes
from rest_framework.request import Request

from access_app.callers import request_caller
from access_app.permissions import scope_required
from sdxl_service.api.schema import error_responses
from training_app.services.events import (
    MAX_EVENT_ID,
    Kind,
    event_blocks,
    event_subject_check,
    last_event_id,
)

TAGS = ["events"]
T = TypeVar("T", bound=Callable[..., Any])
EVENT_STREAM = "text/event-stream"


DESCRIPTION = (
    "Server-Sent Events: each event is `id: <id>`, `event: <name>` (started, progress, "
    "sample, checkpoint, completed, failed, cancelled) and `data: <JSON>`, the body a webhook "
    "posts for it (cancelled: the webhook's failed, named cancelled). A new stream replays "
    "every earlier event first; with `Last-Event-ID: <id>` (or ?last_event_id=) only those "
    "after it. A comment `: ping` comes every SDXL_EVENTS_HEARTBEAT_S (15 s) of silence; the "
    "server closes the stream after the terminal event (completed, failed or cancelled)."
)
EVENT_ID = {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID}
PARAMETERS = [
    OpenApiParameter(
        "Last-Event-ID",
        EVENT_ID,
        OpenApiParameter.HEADER,
        description="Resume: only the events after this id",
    ),
    OpenApiParameter(
        "last_event_id", EVENT_ID, description="As the Last-Event-ID header (the header wins)"
    ),
]


def _stream(request: Request, kind: Kind, subject_id: int) -> StreamingHttpResponse:
    event_subject_check(kind, subject_id, request_caller(request))
    after = last_event_id(
        request.headers.get("Last-Event-ID"), request.query_params.get("last_event_id")
    )
    response = StreamingHttpResponse(event_blocks(kind, subject_id, after), EVENT_STREAM)
    response["Cache-Control"] = "no-cache"
    return response


def _stream_schema(operation_id: str, summary: str) -> Callable[[T], T]:
    """The OpenAPI description the two streams share."""
    return extend_schema(
        operation_id=operation_id,
        tags=TAGS,
        summary=summary,
        description=DESCRIPTION,
        parameters=PARAMETERS,
        responses={
            (200, EVENT_STREAM): OpenApiResponse(str, description="the event stream"),
            **error_responses(404, with_body=False),
        },
    )


@_stream_schema("run_events", "A training run's events as they happen (Server-Sent Events)")
@api_view(["GET"])
@permission_classes(scope_required("read"))
def run_events(request: Request, run_id: int) -> StreamingHttpResponse:
    return _stream(request, "run", run_id)


@_stream_schema("generation_events", "A generation's events as they happen (Server-Sent Events)")
@api_view(["GET"])
@permission_classes(scope_required("read"))
def generation_events(request: Request, generation_id: int) -> StreamingHttpResponse:
    return _stream(request, "generation", generation_id)
