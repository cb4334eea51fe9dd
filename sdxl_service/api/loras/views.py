"""The LoRA file endpoints: download one (diffusers or kohya form) and upload one."""

import base64
import hashlib

from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view, parser_classes, permission_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from access_app.callers import request_caller
from access_app.permissions import scope_required
from sdxl_service.api.common import rendered, validated
from sdxl_service.api.loras.serializers import (
    GetLoraResponse,
    GetLoraSerializer,
    UploadLoraFileSerializer,
    UploadLoraResponse,
    UploadLoraSerializer,
)
from sdxl_service.api.parsers import JSONParser
from sdxl_service.api.schema import error_responses
from training_app import selectors as training_selectors
from training_app.services import loras

TAGS = ["LoRA files"]


@extend_schema(
    operation_id="get_lora",
    tags=TAGS,
    summary="Download a LoRA: the latest, number `iteration`, or any by `lora_filename`",
    description='`"format": "kohya"` sends the same adapter with kohya keys '
    "(`lora_unet_*`, `.alpha`) and the `ss_*` metadata AUTOMATIC1111 and ComfyUI read.",
    request=GetLoraSerializer,
    responses={200: GetLoraResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("read"))
def get_lora(request: Request) -> Response:
    data = validated(GetLoraSerializer, request)
    artifact = training_selectors.lora_file_get(
        data["session_id"],
        data.get("iteration"),
        data.get("lora_filename"),
        request_caller(request),
    )
    lora = loras.lora_read(artifact, data["format"])
    body = {
        "session_id": data["session_id"],
        "lora_filename": artifact.filename,
        "lora_base64": base64.b64encode(lora).decode("ascii"),
        "iteration": getattr(artifact, "number", None),
        "format": data["format"],
        "sha256": hashlib.sha256(lora).hexdigest(),  # of the bytes sent
    }
    return rendered(GetLoraResponse, body)


@extend_schema(
    operation_id="upload_lora",
    tags=TAGS,
    summary="Store a LoRA file (diffusers, PEFT or kohya) as the session's next LoRA",
    description="A LoRA or LoCon on any Linear or Conv2d module of the Base UNet and both text "
    "encoders, in diffusers, PEFT or kohya form (sd-scripts' SDXL block names or diffusers', "
    "LyCORIS LoCon). Stored in the trainer's diffusers form (other forms are converted, alphas "
    "folded into the weights); without `filename` it becomes `lora_<n>.safetensors`. LoHa, "
    "LoKr, DoRA, (IA)3, GLoRA, OFT, `lora_mid` and biases are refused by name.",
    request={
        "application/json": UploadLoraSerializer,
        "multipart/form-data": UploadLoraFileSerializer,
    },
    responses={200: UploadLoraResponse, **error_responses(404, 409, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
@parser_classes([JSONParser, MultiPartParser])
def upload_lora(request: Request) -> Response:
    if request.content_type.startswith("multipart/"):
        data = validated(UploadLoraFileSerializer, request)
        artifact = loras.lora_upload(
            data["session_id"],
            data["lora"].read(),
            data.get("filename"),
            field="lora",
            caller=request_caller(request),
        )
    else:
        data = validated(UploadLoraSerializer, request)
        artifact = loras.lora_upload(
            data["session_id"],
            data["lora_base64"],
            data.get("filename"),
            caller=request_caller(request),
        )
    return rendered(
        UploadLoraResponse,
        {"status": "success", "lora_filename": artifact.filename, "iteration": artifact.number},
    )
