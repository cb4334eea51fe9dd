"""The generation endpoints: /txt2img (waiting for the images or answering 202 at once), a
generation's status, its cancellation and its images."""

import base64
from collections.abc import Callable

from django.conf import settings
from django.http import FileResponse
from django.http.response import HttpResponseBase
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response

from access_app.callers import request_caller
from access_app.permissions import scope_required
from sdxl_engine.image_output import MEDIA_TYPES
from sdxl_service.api.client_gone import client_gone_event
from sdxl_service.api.common import rendered, validated
from sdxl_service.api.generation.response_serializers import (
    GenerationStatusResponse,
    Txt2ImgQueuedResponse,
    Txt2ImgResponse,
)
from sdxl_service.api.generation.serializers import Txt2ImgSerializer
from sdxl_service.api.idempotency import honours_idempotency_key
from sdxl_service.api.schema import error_responses
from training_app import bodies
from training_app import selectors as training_selectors
from training_app.services.generations import lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

TAGS = ["generation"]


@honours_idempotency_key
@extend_schema(
    operation_id="txt2img",
    tags=TAGS,
    summary="Generate images with SDXL Base + Refiner, optionally with LoRAs or from an image",
    request=Txt2ImgSerializer,
    responses={
        200: Txt2ImgResponse,
        202: OpenApiResponse(Txt2ImgQueuedResponse, description='with "async": true'),
        **error_responses(404, 409, 429, 500, 503, 504),
    },
)
@api_view(["POST"])
@permission_classes(scope_required("generate"))
def txt2img(request: Request) -> Response:
    data = validated(Txt2ImgSerializer, request)
    wait = not data.pop("async")
    response_format = data.pop("response_format")
    generation = generation_request(GenerationRequest(**data, caller=request_caller(request)))
    if not wait:
        body = bodies.generation_queued_body(generation)
        return Response(Txt2ImgQueuedResponse(body).data, status=202)
    generation, images = lifecycle.generation_wait(
        generation.pk, settings.SDXL_TXT2IMG_TIMEOUT, client_gone=_client_gone_check(request)
    )
    body = bodies.generation_answer(generation)
    if response_format == "base64":
        body["images_base64"] = [base64.b64encode(image).decode("ascii") for image in images]
    return rendered(Txt2ImgResponse, body)


@extend_schema(
    operation_id="generation_status",
    tags=TAGS,
    summary="A generation's status, parameters, seeds and image URLs",
    responses={200: GenerationStatusResponse, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def generation_status(request: Request, generation_id: int) -> Response:
    generation = training_selectors.generation_get(generation_id, request_caller(request))
    return rendered(GenerationStatusResponse, bodies.generation_status_body(generation))


@honours_idempotency_key
@extend_schema(
    operation_id="generation_cancel",
    tags=TAGS,
    summary="Cancel a queued or running generation (a finished one is answered unchanged)",
    description="Replicate's POST /predictions/{id}/cancel. A queued generation is cancelled "
    "at once; a running one stops between denoising steps and writes no image. Answers the "
    "generation's status (`cancelled`, with a message saying why); one that has already ended "
    "is answered as it is, unchanged.",
    request=None,
    responses={200: GenerationStatusResponse, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("generate"))
def generation_cancel(request: Request, generation_id: int) -> Response:
    generation = lifecycle.generation_cancel(generation_id, caller=request_caller(request))
    return rendered(GenerationStatusResponse, bodies.generation_status_body(generation))


def _client_gone_check(request: Request) -> Callable[[], bool] | None:
    """Under `serve`'s ASGI server, a check whether the client closed its connection (the
    server's `http.disconnect`, sdxl_service.web_server); None elsewhere (test client,
    WSGI)."""
    client_gone = client_gone_event(request)
    return None if client_gone is None else client_gone.is_set


@extend_schema(
    operation_id="generation_image",
    tags=TAGS,
    summary="An image of a completed generation (its URL is in image_urls)",
    responses={
        (200, "image/png"): bytes,
        (200, "image/jpeg"): bytes,
        (200, "image/webp"): bytes,
        **error_responses(404),
    },
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def generation_image(
    request: Request, generation_id: int, index: int, extension: str
) -> HttpResponseBase:
    generation = training_selectors.generation_get(generation_id, request_caller(request))
    path = lifecycle.generation_image_path(generation, index, extension)
    return FileResponse(path.open("rb"), content_type=MEDIA_TYPES[generation.params.file_format])
