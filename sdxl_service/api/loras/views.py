"""The LoRA file endpoints: download one (diffusers or kohya form, base64 in JSON or as a
plain file) and upload one."""

import base64
import hashlib
from collections.abc import Iterable

from django.http.response import HttpResponseBase
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, parser_classes, permission_classes
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from access_app.callers import request_caller
from access_app.permissions import scope_required
from sdxl_service.api.common import rendered, validated
from sdxl_service.api.idempotency import honours_idempotency_key
from sdxl_service.api.loras.serializers import (
    GetLoraResponse,
    GetLoraSerializer,
    LoraFileQuerySerializer,
    UploadLoraFileSerializer,
    UploadLoraResponse,
    UploadLoraSerializer,
)
from sdxl_service.api.parsers import JSONParser
from sdxl_service.api.ranges import download_response
from sdxl_service.api.schema import ErrorSerializer, error_responses
from training_app import links
from training_app import selectors as training_selectors
from training_app.services import loras

TAGS = ["LoRA files"]


class FormatIsTheViewsOwn(DefaultContentNegotiation):
    """Content negotiation that leaves the `format` query parameter to the view: JSON
    errors whatever it says."""

    def select_renderer(
        self,
        request: Request,
        renderers: Iterable[BaseRenderer],
        format_suffix: str | None = None,
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


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
        "lora_url": links.lora_download_url(artifact, data["format"]),
    }
    return rendered(GetLoraResponse, body)


@extend_schema(
    operation_id="lora_file",
    tags=TAGS,
    summary="Download a LoRA file of the session (a numbered LoRA or a checkpoint) as a file",
    description="The stored `.safetensors` as an attachment (`curl -OJ`), or with "
    "`?format=kohya` the same adapter in kohya's form, named `<stem>.kohya.safetensors`. "
    "`ETag` is the sha256 of the bytes sent (quoted); `If-None-Match` with it answers 304. "
    "Single byte ranges (`Range: bytes=0-99`, `bytes=100-`, `bytes=-100`) answer 206 with "
    "`Content-Range`, a range past the end 416; `If-Range` is honoured. `<lora_filename>` "
    "is any name /get_lora takes: `lora_<n>.safetensors`, an uploaded name, or a run's "
    "checkpoint `lora_run<run>_step<step>.safetensors`.",
    parameters=[LoraFileQuerySerializer],
    responses={
        (200, "application/octet-stream"): OpenApiResponse(bytes, description="the file"),
        (206, "application/octet-stream"): OpenApiResponse(
            bytes, description="the bytes of the range asked for"
        ),
        304: OpenApiResponse(description="If-None-Match named the file's ETag"),
        416: OpenApiResponse(
            ErrorSerializer,
            description="the range lies outside the file (Content-Range: bytes */<size>)",
        ),
        **error_responses(400, 404, 409, with_body=False),
    },
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def lora_file(request: Request, session_id: int, lora_filename: str) -> HttpResponseBase:
    query = LoraFileQuerySerializer(data=request.query_params)
    query.is_valid(raise_exception=True)
    artifact = training_selectors.lora_file_get(
        session_id, lora_filename=lora_filename, caller=request_caller(request)
    )
    download = loras.lora_download(artifact, query.validated_data["format"])
    return download_response(
        request,
        download.handle,
        download.size,
        sha256=download.sha256,
        filename=download.filename,
    )


# `?format=` names the LoRA's form here, not one of DRF's renderers (URL_FORMAT_OVERRIDE).
lora_file.cls.content_negotiation_class = FormatIsTheViewsOwn


@honours_idempotency_key
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
