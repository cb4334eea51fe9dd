"""The training endpoints: start, follow and cancel a run, and its sample images."""

from django.http import FileResponse
from django.http.response import HttpResponseBase
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response

from access_app.callers import request_caller
from access_app.permissions import scope_required
from core.errors import ServiceError
from sdxl_service.api.common import rendered, validated
from sdxl_service.api.idempotency import honours_idempotency_key
from sdxl_service.api.schema import error_responses
from sdxl_service.api.sessions.serializers import SessionRefSerializer
from sdxl_service.api.training.serializers import (
    TRAIN_STATUS_SCHEMA,
    CancelTrainingResponse,
    TrainLoraResponse,
    TrainLoraSerializer,
    TrainStatusResponse,
)
from sessions_app import selectors as session_selectors
from training_app import bodies
from training_app import selectors as training_selectors
from training_app.services import runs, watch

TAGS = ["training"]


@honours_idempotency_key
@extend_schema(
    operation_id="train_lora",
    tags=TAGS,
    summary="Queue a LoRA training run on the session's captioned images",
    request=TrainLoraSerializer,
    responses={200: TrainLoraResponse, **error_responses(404, 409, 429, 503)},
)
@api_view(["POST"])
@permission_classes(scope_required("train"))
def train_lora(request: Request) -> Response:
    data = validated(TrainLoraSerializer, request)
    run = runs.training_run_start(
        data["session_id"],
        TrainLoraSerializer.training_parameters(data),
        **TrainLoraSerializer.webhook(data),
        caller=request_caller(request),
        init_lora=data.get("init_lora"),
    )
    return rendered(TrainLoraResponse, bodies.training_started_body(run))


@extend_schema(
    operation_id="train_status",
    tags=TAGS,
    summary="The latest run's status: one of five shapes",
    description="`in-progress` carries extra keys: `queued`, `stage` (queued, loading, "
    "caching, training, saving), `step`, `total_steps`, `loss`, `eta_seconds`.",
    request=SessionRefSerializer,
    responses={200: TRAIN_STATUS_SCHEMA, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("read"))
def train_status(request: Request) -> Response:
    data = validated(SessionRefSerializer, request)
    session_selectors.session_get(data["session_id"], request_caller(request))
    return rendered(TrainStatusResponse, bodies.training_status(data["session_id"]))


@honours_idempotency_key
@extend_schema(
    operation_id="cancel_training",
    tags=TAGS,
    summary="Stop the session's queued or running training run",
    description="A running run stops within one step and saves nothing; /train_status "
    'then answers `{"status": "cancelled", "message": "training was cancelled"}`.',
    request=SessionRefSerializer,
    responses={200: CancelTrainingResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("train"))
def cancel_training(request: Request) -> Response:
    data = validated(SessionRefSerializer, request)
    run = runs.training_run_cancel(data["session_id"], request_caller(request))
    return rendered(
        CancelTrainingResponse,
        {"status": "cancelled", "session_id": data["session_id"], "run_id": run.pk},
    )


@extend_schema(
    operation_id="training_samples",
    tags=TAGS,
    summary="A sample image a run rendered (its URL is listed by /train_status)",
    responses={(200, "image/png"): bytes, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def training_sample(request: Request, sample_id: int) -> HttpResponseBase:
    sample = training_selectors.training_sample_get(sample_id, request_caller(request))
    path = watch.sample_path(sample)
    if not path.is_file():
        raise ServiceError(f"sample {sample_id} is recorded but its image is missing", status=404)
    return FileResponse(path.open("rb"), content_type="image/png")
