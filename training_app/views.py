"""Training, LoRA and generation endpoints of API.md: validate, call one service, serialize."""

import base64
import hashlib

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view
from rest_framework.response import Response

from sdxl_service.api import error_responses, validated
from sessions_app.selectors import session_get
from sessions_app.serializers import SessionRefSerializer
from training_app import selectors, services
from training_app.generations import GenerationRequest, generation_request, generation_wait
from training_app.serializers import (
    CancelTrainingResponse,
    GetLoraResponse,
    GetLoraSerializer,
    TrainLoraResponse,
    TrainLoraSerializer,
    Txt2ImgResponse,
    Txt2ImgSerializer,
    UploadLoraResponse,
    UploadLoraSerializer,
    train_status_response,
)

TRAINING, LORAS, GENERATION = ["training"], ["LoRA files"], ["generation"]


@extend_schema(
    operation_id="train_lora",
    tags=TRAINING,
    summary="Queue a LoRA training run on the session's captioned images",
    request=TrainLoraSerializer,
    responses={200: TrainLoraResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
def train_lora(request):
    data = validated(TrainLoraSerializer, request)
    run = services.training_run_start(
        data["session_id"], TrainLoraSerializer.training_parameters(data)
    )
    return Response({"status": "started", "run_id": run.pk})


@extend_schema(
    operation_id="train_status",
    tags=TRAINING,
    summary="The latest run's status: one of four shapes",
    description="`in-progress` carries extra keys: `queued`, `stage` (queued, loading, "
    "caching, training, saving), `step`, `total_steps`, `loss`, `eta_seconds`.",
    request=SessionRefSerializer,
    responses={200: train_status_response(), **error_responses(404)},
)
@api_view(["POST"])
def train_status(request):
    data = validated(SessionRefSerializer, request)
    session_get(data["session_id"])
    return Response(selectors.training_status(data["session_id"]))


@extend_schema(
    operation_id="cancel_training",
    tags=TRAINING,
    summary="Stop the session's queued or running training run",
    description="A running run stops within one step and saves nothing; /train_status "
    'then answers `{"status": "error", "message": "training was cancelled"}`.',
    request=SessionRefSerializer,
    responses={200: CancelTrainingResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
def cancel_training(request):
    data = validated(SessionRefSerializer, request)
    run = services.training_run_cancel(data["session_id"])
    return Response(
        {"status": "cancelled", "session_id": str(data["session_id"]), "run_id": run.pk}
    )


@extend_schema(
    operation_id="get_lora",
    tags=LORAS,
    summary="Download a LoRA: the latest, or number `iteration`",
    description='`"format": "kohya"` sends the same adapter with kohya keys '
    "(`lora_unet_*`, `.alpha`) and the `ss_*` metadata AUTOMATIC1111 and ComfyUI read.",
    request=GetLoraSerializer,
    responses={200: GetLoraResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
def get_lora(request):
    data = validated(GetLoraSerializer, request)
    artifact = selectors.lora_get(data["session_id"], data.get("iteration"))
    lora = services.lora_read(artifact, data["format"])
    return Response(
        {
            "session_id": str(data["session_id"]),
            "lora_filename": artifact.filename,
            "lora_base64": base64.b64encode(lora).decode("ascii"),
            "iteration": artifact.number,
            "format": data["format"],
            "sha256": hashlib.sha256(lora).hexdigest(),  # of the bytes sent
        }
    )


@extend_schema(
    operation_id="upload_lora",
    tags=LORAS,
    summary="Store a LoRA file (diffusers, PEFT or kohya) as the session's next LoRA",
    description="Stored in the trainer's diffusers form (kohya and PEFT files are converted, "
    "alphas folded into the weights); without `filename` it becomes `lora_<n>.safetensors`.",
    request=UploadLoraSerializer,
    responses={200: UploadLoraResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
def upload_lora(request):
    data = validated(UploadLoraSerializer, request)
    artifact = services.lora_upload(data["session_id"], data["lora_base64"], data.get("filename"))
    return Response(
        {"status": "success", "lora_filename": artifact.filename, "iteration": artifact.number}
    )


@extend_schema(
    operation_id="txt2img",
    tags=GENERATION,
    summary="Generate images with SDXL Base + Refiner, optionally with the session's LoRA",
    request=Txt2ImgSerializer,
    responses={200: Txt2ImgResponse, **error_responses(404, 500, 503, 504)},
)
@api_view(["POST"])
def txt2img(request):
    data = validated(Txt2ImgSerializer, request)
    generation = generation_request(GenerationRequest(**data))
    generation, images = generation_wait(generation.pk, settings.SDXL_TXT2IMG_TIMEOUT)
    return Response(
        {
            "images_base64": [base64.b64encode(png).decode("ascii") for png in images],
            "seed": generation.seed,
            "lora": (
                {"filename": generation.lora_filename, "sha256": generation.lora_sha256}
                if generation.lora_filename
                else None
            ),
            "duration_ms": generation.duration_ms,
        }
    )
