"""Training, LoRA and generation endpoints of API.md: validate, call one service, serialize."""

import base64
import hashlib

from django.conf import settings
from rest_framework.decorators import api_view
from rest_framework.response import Response

from sdxl_service.api import validated
from sessions_app.selectors import session_get
from sessions_app.serializers import SessionRefSerializer
from training_app import selectors, services
from training_app.generations import GenerationRequest, generation_request, generation_wait
from training_app.serializers import (
    GetLoraSerializer,
    TrainLoraSerializer,
    Txt2ImgSerializer,
    UploadLoraSerializer,
)


@api_view(["POST"])
def train_lora(request):
    data = validated(TrainLoraSerializer, request)
    run = services.training_run_start(
        data["session_id"], TrainLoraSerializer.training_parameters(data)
    )
    return Response({"status": "started", "run_id": run.pk})


@api_view(["POST"])
def train_status(request):
    data = validated(SessionRefSerializer, request)
    session_get(data["session_id"])
    return Response(selectors.training_status(data["session_id"]))


@api_view(["POST"])
def cancel_training(request):
    data = validated(SessionRefSerializer, request)
    run = services.training_run_cancel(data["session_id"])
    return Response(
        {"status": "cancelled", "session_id": str(data["session_id"]), "run_id": run.pk}
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


@api_view(["POST"])
def upload_lora(request):
    data = validated(UploadLoraSerializer, request)
    artifact = services.lora_upload(data["session_id"], data["lora_base64"], data.get("filename"))
    return Response(
        {"status": "success", "lora_filename": artifact.filename, "iteration": artifact.number}
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
