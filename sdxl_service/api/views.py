"""The API's endpoints (docs/api.md): validate the body, call one service, render the answer
through its response serializer. Errors are raised as ServiceError and shaped in one place
(sdxl_service.api.errors)."""

import base64
import hashlib
import socket
from collections.abc import Callable

from django.conf import settings
from django.http import FileResponse
from django.urls import reverse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import (
    api_view,
    authentication_classes,
    parser_classes,
    permission_classes,
)
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from access_app.permissions import scope_required
from core.errors import ServiceError
from sdxl_engine.image_output import MEDIA_TYPES
from sdxl_service import health
from sdxl_service.api import serializers as api
from sdxl_service.api.parsers import JSONParser
from sdxl_service.api.schema import error_responses
from sessions_app import selectors as session_selectors
from sessions_app import services as session_services
from sessions_app import storage as session_storage
from training_app import selectors as training_selectors
from training_app.selectors import session_image_item
from training_app.services import loras, runs, watch
from training_app.services.generations import lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

SESSIONS, TRAINING, LORAS, GENERATION = ["sessions"], ["training"], ["LoRA files"], ["generation"]


def validated(serializer_class, request) -> dict:
    """The request body checked by `serializer_class`; a 400 naming the field otherwise."""
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def rendered(serializer_class, body: dict) -> Response:
    """`body` as `serializer_class` renders it: only what the schema describes goes out."""
    return Response(serializer_class(body).data)


# --- Sessions ----------------------------------------------------------------------------


@extend_schema(
    operation_id="create_session",
    tags=SESSIONS,
    summary="Create an empty session",
    responses={200: api.CreateSessionResponse, **error_responses(429, with_body=False)},
)
@api_view(["GET"])
@permission_classes(scope_required("upload"))
def create_session(request):
    session = session_services.session_create(caller=request.user)
    return rendered(api.CreateSessionResponse, {"session_id": session.pk})


@extend_schema(
    operation_id="post_session_image",
    tags=SESSIONS,
    summary="Add one captioned training image (a new group folder)",
    description="PNG, JPEG, WebP or BMP, base64 (a data: URL prefix is accepted). Stored "
    "as `session_<id>/<n>/0.<ext>` with its prompt in `0.txt`.",
    request=api.PostSessionImageSerializer,
    responses={200: api.SuccessResponse, **error_responses(404, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
def post_session_image(request):
    data = validated(api.PostSessionImageSerializer, request)
    session_services.session_image_add(
        data["session_id"], data["image_base64"], data["prompt"], caller=request.user
    )
    return rendered(api.SuccessResponse, {"status": "success"})


@extend_schema(
    operation_id="list_sessions",
    tags=SESSIONS,
    summary="Every session with its latest LoRA, group count and training status",
    parameters=[api.ListSessionsQuery],
    responses={200: api.ListSessionsResponse, **error_responses()},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def list_sessions(request):
    query = api.ListSessionsQuery(data=request.query_params)
    query.is_valid(raise_exception=True)
    page = query.validated_data
    everything = session_selectors.session_list(request.user)
    offset, limit = page.get("offset", 0), page.get("limit")
    sessions = list(everything[offset : None if limit is None else offset + limit])
    ids = [session.pk for session in sessions]
    latest_loras = training_selectors.latest_lora_filenames(ids)
    latest_runs = training_selectors.latest_runs(ids)
    body = {
        "sessions": [
            {
                "session_id": session.pk,
                "latest_lora": latest_loras.get(session.pk),
                "image_groups": session.group_count,
                "training": training_selectors.training_status_body(latest_runs.get(session.pk)),
            }
            for session in sessions
        ]
    }
    if page:  # without limit and offset, exactly the original answer
        count = everything.count()
        end = offset + len(sessions)
        body |= {"count": count, "next_offset": end if end < count else None}
    return rendered(api.ListSessionsResponse, body)


@extend_schema(
    operation_id="session_detail",
    tags=SESSIONS,
    summary="A session: its images, LoRA files, checkpoints, runs and recent generations",
    responses={200: api.SessionDetailResponse, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def session_detail(request, session_id: int):
    detail = training_selectors.session_detail(session_id, request.user)
    return rendered(api.SessionDetailResponse, detail)


@extend_schema(
    operation_id="session_images_upload",
    tags=SESSIONS,
    summary="Add training images as files: several with their captions, or a zip",
    description="multipart/form-data: `image` files with one `caption` each, in order, and/or "
    "an `archive` zip of images with a .txt caption beside each. Every image is checked as "
    "/post_session_image checks one, and each becomes its own group; all are stored or none. "
    "Zips are refused whole for unsafe paths, links, more than 2000 files or more than "
    "SDXL_MAX_UPLOAD_MB unpacked (413); the request for more than SDXL_MAX_UPLOAD_MB of files.",
    request={"multipart/form-data": api.SessionImagesUploadSerializer},
    responses={200: api.SessionImagesUploadResponse, **error_responses(404, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
@parser_classes([MultiPartParser])
def session_images_upload(request, session_id: int):
    data = validated(api.SessionImagesUploadSerializer, request)
    archive = data.get("archive")
    images = session_services.session_images_upload(
        session_id,
        [(upload.name, upload.read()) for upload in data.get("image", [])],
        data.get("caption", []),
        (archive.name, archive.read()) if archive is not None else None,
        caller=request.user,
    )
    body = {"status": "success", "images": [session_image_item(image) for image in images]}
    return rendered(api.SessionImagesUploadResponse, body)


@extend_schema(
    operation_id="session_image",
    tags=SESSIONS,
    summary="A training image of the session, as uploaded",
    responses={
        (200, "image/png"): bytes,
        (200, "image/jpeg"): bytes,
        (200, "image/webp"): bytes,
        (200, "image/bmp"): bytes,
        **error_responses(404),
    },
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def session_image(request, session_id: int, image_id: int):
    image = session_selectors.training_image_get(session_id, image_id, request.user)
    path = session_storage.absolute_path(image.file)
    if not path.is_file():
        raise ServiceError(f"image {image_id} is recorded but its file is missing", status=404)
    return FileResponse(path.open("rb"), content_type=f"image/{image.image_format.lower()}")


@extend_schema(
    operation_id="delete_session",
    tags=SESSIONS,
    summary="Delete a session, its files and rows (a running training stops)",
    request=api.SessionRefSerializer,
    responses={200: api.DeleteSessionResponse, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("delete"))
def delete_session(request):
    data = validated(api.SessionRefSerializer, request)
    session_services.session_delete(data["session_id"], caller=request.user)
    return rendered(
        api.DeleteSessionResponse, {"status": "deleted", "session_id": data["session_id"]}
    )


# --- Training ----------------------------------------------------------------------------


@extend_schema(
    operation_id="train_lora",
    tags=TRAINING,
    summary="Queue a LoRA training run on the session's captioned images",
    request=api.TrainLoraSerializer,
    responses={200: api.TrainLoraResponse, **error_responses(404, 409, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("train"))
def train_lora(request):
    data = validated(api.TrainLoraSerializer, request)
    run = runs.training_run_start(
        data["session_id"],
        api.TrainLoraSerializer.training_parameters(data),
        **api.TrainLoraSerializer.webhook(data),
        caller=request.user,
    )
    return rendered(api.TrainLoraResponse, {"status": "started", "run_id": run.pk})


@extend_schema(
    operation_id="train_status",
    tags=TRAINING,
    summary="The latest run's status: one of four shapes",
    description="`in-progress` carries extra keys: `queued`, `stage` (queued, loading, "
    "caching, training, saving), `step`, `total_steps`, `loss`, `eta_seconds`.",
    request=api.SessionRefSerializer,
    responses={200: api.TRAIN_STATUS_SCHEMA, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("read"))
def train_status(request):
    data = validated(api.SessionRefSerializer, request)
    session_selectors.session_get(data["session_id"], request.user)
    return rendered(api.TrainStatusResponse, training_selectors.training_status(data["session_id"]))


@extend_schema(
    operation_id="cancel_training",
    tags=TRAINING,
    summary="Stop the session's queued or running training run",
    description="A running run stops within one step and saves nothing; /train_status "
    'then answers `{"status": "error", "message": "training was cancelled"}`.',
    request=api.SessionRefSerializer,
    responses={200: api.CancelTrainingResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("train"))
def cancel_training(request):
    data = validated(api.SessionRefSerializer, request)
    run = runs.training_run_cancel(data["session_id"], request.user)
    return rendered(
        api.CancelTrainingResponse,
        {"status": "cancelled", "session_id": data["session_id"], "run_id": run.pk},
    )


# --- LoRA files --------------------------------------------------------------------------


@extend_schema(
    operation_id="get_lora",
    tags=LORAS,
    summary="Download a LoRA: the latest, number `iteration`, or any by `lora_filename`",
    description='`"format": "kohya"` sends the same adapter with kohya keys '
    "(`lora_unet_*`, `.alpha`) and the `ss_*` metadata AUTOMATIC1111 and ComfyUI read.",
    request=api.GetLoraSerializer,
    responses={200: api.GetLoraResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("read"))
def get_lora(request):
    data = validated(api.GetLoraSerializer, request)
    artifact = training_selectors.lora_file_get(
        data["session_id"], data.get("iteration"), data.get("lora_filename"), request.user
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
    return rendered(api.GetLoraResponse, body)


@extend_schema(
    operation_id="upload_lora",
    tags=LORAS,
    summary="Store a LoRA file (diffusers, PEFT or kohya) as the session's next LoRA",
    description="A LoRA or LoCon on any Linear or Conv2d module of the Base UNet and both text "
    "encoders, in diffusers, PEFT or kohya form (sd-scripts' SDXL block names or diffusers', "
    "LyCORIS LoCon). Stored in the trainer's diffusers form (other forms are converted, alphas "
    "folded into the weights); without `filename` it becomes `lora_<n>.safetensors`. LoHa, "
    "LoKr, DoRA, (IA)3, GLoRA, OFT, `lora_mid` and biases are refused by name.",
    request={
        "application/json": api.UploadLoraSerializer,
        "multipart/form-data": api.UploadLoraFileSerializer,
    },
    responses={200: api.UploadLoraResponse, **error_responses(404, 409, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
@parser_classes([JSONParser, MultiPartParser])
def upload_lora(request):
    if request.content_type.startswith("multipart/"):
        data = validated(api.UploadLoraFileSerializer, request)
        artifact = loras.lora_upload(
            data["session_id"],
            data["lora"].read(),
            data.get("filename"),
            field="lora",
            caller=request.user,
        )
    else:
        data = validated(api.UploadLoraSerializer, request)
        artifact = loras.lora_upload(
            data["session_id"], data["lora_base64"], data.get("filename"), caller=request.user
        )
    return rendered(
        api.UploadLoraResponse,
        {"status": "success", "lora_filename": artifact.filename, "iteration": artifact.number},
    )


# --- Generation --------------------------------------------------------------------------


@extend_schema(
    operation_id="txt2img",
    tags=GENERATION,
    summary="Generate images with SDXL Base + Refiner, optionally with LoRAs or from an image",
    request=api.Txt2ImgSerializer,
    responses={
        200: api.Txt2ImgResponse,
        202: OpenApiResponse(api.Txt2ImgQueuedResponse, description='with "async": true'),
        **error_responses(404, 409, 429, 500, 503, 504),
    },
)
@api_view(["POST"])
@permission_classes(scope_required("generate"))
def txt2img(request):
    data = validated(api.Txt2ImgSerializer, request)
    wait = not data.pop("async")
    response_format = data.pop("response_format")
    generation = generation_request(
        GenerationRequest(**data, caller=request.user)
    )
    if not wait:
        body = {
            "generation_id": generation.pk,
            "status": generation.status,
            "status_url": reverse("generation", args=[generation.pk]),
        }
        return Response(api.Txt2ImgQueuedResponse(body).data, status=202)
    generation, images = lifecycle.generation_wait(
        generation.pk, settings.SDXL_TXT2IMG_TIMEOUT, client_gone=_client_gone_check(request)
    )
    body = {
        "generation_id": generation.pk,
        **lifecycle.generation_summary(generation),
        "image_urls": lifecycle.generation_image_urls(generation),
    }
    if response_format == "base64":
        body["images_base64"] = [base64.b64encode(image).decode("ascii") for image in images]
    return rendered(api.Txt2ImgResponse, body)


@extend_schema(
    operation_id="generation_status",
    tags=GENERATION,
    summary="A generation's status, parameters, seeds and image URLs",
    responses={200: api.GenerationStatusResponse, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def generation_status(request, generation_id: int):
    generation = training_selectors.generation_get(generation_id, request.user)
    return rendered(api.GenerationStatusResponse, lifecycle.generation_status_body(generation))


@extend_schema(
    operation_id="generation_cancel",
    tags=GENERATION,
    summary="Cancel a queued or running generation (a finished one is answered unchanged)",
    description="Replicate's POST /predictions/{id}/cancel. A queued generation is cancelled "
    "at once; a running one stops between denoising steps and writes no image. Answers the "
    "generation's status (`cancelled`, with a message saying why); one that has already ended "
    "is answered as it is, unchanged.",
    request=None,
    responses={200: api.GenerationStatusResponse, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("generate"))
def generation_cancel(request, generation_id: int):
    generation = lifecycle.generation_cancel(generation_id, caller=request.user)
    return rendered(api.GenerationStatusResponse, lifecycle.generation_status_body(generation))


def _client_gone_check(request) -> Callable[[], bool] | None:
    """Under gunicorn, a check whether the client closed its connection (a peek at the
    socket that reads nothing: end of stream); None elsewhere (test client, runserver)."""
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return None

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read: still connected, waiting for us
            return False
        except ValueError:  # a TLS socket takes no flags: cannot tell, so assume present
            return False
        except OSError:  # reset by the peer
            return True

    return gone


@extend_schema(
    operation_id="generation_image",
    tags=GENERATION,
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
def generation_image(request, generation_id: int, index: int, extension: str):
    generation = training_selectors.generation_get(generation_id, request.user)
    path = lifecycle.generation_image_path(generation, index, extension)
    return FileResponse(path.open("rb"), content_type=MEDIA_TYPES[generation.params.file_format])


@extend_schema(
    operation_id="training_samples",
    tags=TRAINING,
    summary="A sample image a run rendered (its URL is listed by /train_status)",
    responses={(200, "image/png"): bytes, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def training_sample(request, sample_id: int):
    sample = training_selectors.training_sample_get(sample_id, request.user)
    path = watch.sample_path(sample)
    if not path.is_file():
        raise ServiceError(f"sample {sample_id} is recorded but its image is missing", status=404)
    return FileResponse(path.open("rb"), content_type="image/png")


# --- Health ------------------------------------------------------------------------------


@extend_schema(
    operation_id="healthz",
    tags=["health"],
    summary="Health for load balancers: database, broker, workers (no token needed)",
    description="Needs no token, even with API tokens configured, and reveals nothing "
    "secret (no host, path or URL). `down` (503): the database cannot be queried or the "
    "broker is unreachable: this process cannot serve the API. `degraded` (200): database "
    "and broker are fine but a generation or training worker has no fresh heartbeat (the "
    "web process is healthy; /txt2img answers 503 until a generation worker runs). `ok` "
    "(200): everything is fine.",
    auth=[],
    responses={
        200: OpenApiResponse(api.HealthResponse, description="ok or degraded"),
        503: OpenApiResponse(
            api.HealthResponse, description="down: the database or the broker fails"
        ),
    },
)
@api_view(["GET", "HEAD"])  # load balancers probe with either
@authentication_classes([])
@permission_classes([AllowAny])
def healthz(request):
    report = health.service_health()
    response = Response(api.HealthResponse(report.as_dict()).data, status=report.http_status)
    response["Cache-Control"] = "no-store"
    return response
