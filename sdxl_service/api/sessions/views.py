"""The session endpoints: create, list, show and delete sessions, add training images.
Each validates the body, calls one service and renders the answer through its response
serializer; errors are raised as ServiceError and shaped in one place
(sdxl_service.api.errors)."""

from django.http import FileResponse, HttpResponse
from django.http.response import HttpResponseBase
from django.utils.cache import get_conditional_response
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, parser_classes, permission_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from access_app.callers import request_caller
from access_app.permissions import scope_required
from core.errors import ServiceError
from sdxl_service.api.common import rendered, validated, validated_query
from sdxl_service.api.idempotency import honours_idempotency_key
from sdxl_service.api.schema import error_responses
from sdxl_service.api.sessions.serializers import (
    CreateSessionResponse,
    DeleteSessionImageResponse,
    DeleteSessionResponse,
    ListSessionsQuery,
    ListSessionsResponse,
    PostSessionImageSerializer,
    SessionCaptionsResponse,
    SessionCaptionsSerializer,
    SessionDetailResponse,
    SessionImageItem,
    SessionImageMaskSerializer,
    SessionImagePatchSerializer,
    SessionImagesUploadResponse,
    SessionImagesUploadSerializer,
    SessionMasksResponse,
    SessionMasksSerializer,
    SessionRefSerializer,
    SuccessResponse,
)
from sessions_app import automasks
from sessions_app import selectors as session_selectors
from sessions_app import services as session_services
from sessions_app import storage as session_storage
from training_app import bodies
from training_app import selectors as training_selectors

TAGS = ["sessions"]


@honours_idempotency_key
@extend_schema(
    operation_id="create_session",
    tags=TAGS,
    summary="Create an empty session",
    responses={200: CreateSessionResponse, **error_responses(429, with_body=False)},
)
@api_view(["GET"])
@permission_classes(scope_required("upload"))
def create_session(request: Request) -> Response:
    session = session_services.session_create(caller=request_caller(request))
    return rendered(CreateSessionResponse, {"session_id": session.pk})


@honours_idempotency_key
@extend_schema(
    operation_id="post_session_image",
    tags=TAGS,
    summary="Add one captioned training image (a new group folder)",
    description="PNG, JPEG, WebP or BMP, base64 (a data: URL prefix is accepted). Stored "
    "as `session_<id>/<n>/0.<ext>` with its prompt in `0.txt` and its `mask_base64`, if "
    "sent, as `0_mask.png` (both checked before anything is written). A prompt `auto` is "
    "written by the captioning model first (409 without one, and nothing is stored).",
    request=PostSessionImageSerializer,
    responses={200: SuccessResponse, **error_responses(404, 409, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
def post_session_image(request: Request) -> Response:
    data = validated(PostSessionImageSerializer, request)
    session_services.session_image_add(
        data["session_id"],
        data["image_base64"],
        data["prompt"],
        caller=request_caller(request),
        mask_bytes=data.get("mask_base64"),
    )
    return rendered(SuccessResponse, {"status": "success"})


@extend_schema(
    operation_id="list_sessions",
    tags=TAGS,
    summary="Every session with its latest LoRA, group count and training status",
    parameters=[ListSessionsQuery],
    responses={200: ListSessionsResponse, **error_responses()},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def list_sessions(request: Request) -> Response:
    page = validated_query(ListSessionsQuery, request)
    everything = session_selectors.session_list(request_caller(request))
    offset, limit = page.get("offset", 0), page.get("limit")
    sessions = list(everything[offset : None if limit is None else offset + limit])
    ids = [session.pk for session in sessions]
    latest_loras = training_selectors.latest_lora_filenames(ids)
    latest_runs = training_selectors.latest_runs(ids)
    body: dict[str, object] = {
        "sessions": [
            bodies.session_summary(
                session, latest_loras.get(session.pk), latest_runs.get(session.pk)
            )
            for session in sessions
        ]
    }
    if page:  # without limit and offset, exactly the original answer
        count = everything.count()
        end = offset + len(sessions)
        body |= {"count": count, "next_offset": end if end < count else None}
    return rendered(ListSessionsResponse, body)


@extend_schema(
    operation_id="session_detail",
    tags=TAGS,
    summary="A session: its images, LoRA files, checkpoints, runs and recent generations",
    responses={200: SessionDetailResponse, **error_responses(404)},
)
@api_view(["GET"])
@permission_classes(scope_required("read"))
def session_detail(request: Request, session_id: int) -> Response:
    detail = training_selectors.session_detail(session_id, request_caller(request))
    return rendered(SessionDetailResponse, bodies.session_detail_body(detail))


@honours_idempotency_key
@extend_schema(
    operation_id="session_images_upload",
    tags=TAGS,
    summary="Add training images as files: several with their captions, or a zip",
    description="multipart/form-data: `image` files with one `caption` and one `mask` each, "
    "in order (no `caption`: empty captions; no `mask`: no masks; any other count is a 400), "
    "and/or an `archive` zip of images with a .txt caption and a `<name>_mask.png` mask "
    "beside each. Every image and mask is checked as /post_session_image checks one, and "
    "each image becomes its own group; all are stored or none. Zips are refused whole for "
    "unsafe paths, links, more than 2000 files or more than SDXL_MAX_UPLOAD_MB unpacked "
    "(413); the request for more than SDXL_MAX_UPLOAD_MB of files. "
    "A caption `auto` is written by the captioning model first (409 without one).",
    request={"multipart/form-data": SessionImagesUploadSerializer},
    responses={200: SessionImagesUploadResponse, **error_responses(404, 409, 429)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
@parser_classes([MultiPartParser])
def session_images_upload(request: Request, session_id: int) -> Response:
    data = validated(SessionImagesUploadSerializer, request)
    archive = data.get("archive")
    images = session_services.session_images_upload(
        session_id,
        [(upload.name, upload.read()) for upload in data.get("image", [])],
        data.get("caption", []),
        (archive.name, archive.read()) if archive is not None else None,
        caller=request_caller(request),
        masks=[(upload.name, upload.read()) for upload in data.get("mask", [])],
    )
    body = {"status": "success", "images": [bodies.session_image_item(image) for image in images]}
    return rendered(SessionImagesUploadResponse, body)


@honours_idempotency_key
@extend_schema(
    operation_id="session_masks_create",
    tags=TAGS,
    summary="Mask the session's images automatically: their faces, or their subject",
    description="Fills the images that have no mask (every image with `overwrite`) and "
    "answers, per image, whether something was found; an image where nothing is found keeps "
    "what it had. `face` needs no model (OpenCV's bundled face detector); `subject` runs "
    "the segmentation model SDXL_SUBJECT_MASK_MODEL (a CLIPSeg), and answers 409 naming the "
    "setting when none is configured (the tiny preset builds a tiny random one: noise "
    "masks). Runs in the request. 409 (naming the run) while a training run of the session "
    "is queued or running.",
    request=SessionMasksSerializer,
    responses={200: SessionMasksResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
def session_masks(request: Request, session_id: int) -> Response:
    data = validated(SessionMasksSerializer, request)
    masks = automasks.session_masks_create(
        session_id,
        data["kind"],
        overwrite=data["overwrite"],
        prompt=data.get("prompt"),
        caller=request_caller(request),
    )
    return rendered(SessionMasksResponse, automasks.session_masks_body(masks))


@honours_idempotency_key
@extend_schema(
    operation_id="session_captions_create",
    tags=TAGS,
    summary="Caption the session's images with the captioning model",
    description="Captions every image whose caption is empty (every image with "
    "`overwrite`) with the image-to-text model of SDXL_CAPTION_MODEL (BLIP, in the web "
    "process, on the CPU), `prefix` first, and writes each caption's file and row, all or "
    "none. With the tiny model preset and no SDXL_CAPTION_MODEL, a tiny random captioner "
    "writes random words. 409 without a captioning model (naming SDXL_CAPTION_MODEL), and "
    "while a training run of the session is queued or running (naming the run).",
    request=SessionCaptionsSerializer,
    responses={200: SessionCaptionsResponse, **error_responses(404, 409)},
)
@api_view(["POST"])
@permission_classes(scope_required("upload"))
def session_captions_create(request: Request, session_id: int) -> Response:
    data = validated(SessionCaptionsSerializer, request)
    written = session_services.session_captions_create(
        session_id, data["overwrite"], data["prefix"], caller=request_caller(request)
    )
    return rendered(SessionCaptionsResponse, {**written})


class ScopedByMethod(APIView):
    """A view whose methods need different scopes: SCOPES by HTTP method (read for any
    other)."""

    SCOPES: dict[str, str] = {}

    def get_permissions(self) -> list[BasePermission]:
        scope = self.SCOPES.get(self.request.method or "GET", "read")
        return [permission() for permission in scope_required(scope)]


class SessionImageView(ScopedByMethod):
    """/sessions/<id>/images/<image_id>: read the image (GET, `read`), fix its caption
    (PATCH, `upload`, as adding it), or remove it (DELETE, `delete`, as a session)."""

    SCOPES = {"GET": "read", "PATCH": "upload", "DELETE": "delete"}

    @extend_schema(
        operation_id="session_image",
        tags=TAGS,
        summary="A training image of the session, as uploaded",
        responses={
            (200, "image/png"): bytes,
            (200, "image/jpeg"): bytes,
            (200, "image/webp"): bytes,
            (200, "image/bmp"): bytes,
            **error_responses(404),
        },
    )
    def get(self, request: Request, session_id: int, image_id: int) -> HttpResponseBase:
        image = session_selectors.training_image_get(session_id, image_id, request_caller(request))
        path = session_storage.absolute_path(image.file)
        if not path.is_file():
            raise ServiceError(f"image {image_id} is recorded but its file is missing", status=404)
        return FileResponse(path.open("rb"), content_type=f"image/{image.image_format.lower()}")

    @extend_schema(
        operation_id="session_image_update",
        tags=TAGS,
        summary="Fix a training image's caption",
        description="Rewrites the image's caption file (`<n>/<k>.txt`, atomically) and "
        "answers the image as `GET /sessions/<id>` lists it. 409 (naming the run) while a "
        "training run of the session is queued or running; nothing changes then.",
        request=SessionImagePatchSerializer,
        responses={200: SessionImageItem, **error_responses(404, 409)},
    )
    def patch(self, request: Request, session_id: int, image_id: int) -> Response:
        data = validated(SessionImagePatchSerializer, request)
        image = session_services.training_image_caption_set(
            session_id, image_id, data["caption"], caller=request_caller(request)
        )
        return rendered(SessionImageItem, bodies.session_image_item(image))

    @extend_schema(
        operation_id="session_image_delete",
        tags=TAGS,
        summary="Remove one training image, its caption and its mask",
        description="The other images keep their ids, groups and paths (nothing is "
        "renumbered; a group number is never reused); the group folder goes when nothing "
        "else is left in it. 409 (naming the run) while a training run of the session is "
        "queued or running; nothing changes then.",
        responses={200: DeleteSessionImageResponse, **error_responses(404, 409, with_body=False)},
    )
    def delete(self, request: Request, session_id: int, image_id: int) -> Response:
        session_services.training_image_delete(session_id, image_id, caller=request_caller(request))
        body = {"status": "deleted", "session_id": str(session_id), "image_id": image_id}
        return rendered(DeleteSessionImageResponse, body)


session_image = SessionImageView.as_view()


class SessionImageMaskView(ScopedByMethod):
    """/sessions/<id>/images/<image_id>/mask: read the image's mask (GET, `read`), set or
    replace it (PUT) or remove it (DELETE), both `upload`, as a caption edit."""

    SCOPES = {"GET": "read", "PUT": "upload", "DELETE": "upload"}

    @extend_schema(
        operation_id="session_image_mask",
        tags=TAGS,
        summary="A training image's mask, a greyscale PNG (white: the subject)",
        description="`ETag` is the sha256 of the PNG (quoted); `If-None-Match` with it "
        "answers 304. 404 when the image has no mask.",
        responses={
            (200, "image/png"): bytes,
            304: OpenApiResponse(description="If-None-Match named the mask's ETag"),
            **error_responses(404, with_body=False),
        },
    )
    def get(self, request: Request, session_id: int, image_id: int) -> HttpResponseBase:
        image = session_selectors.training_image_get(session_id, image_id, request_caller(request))
        if not image.mask_file:
            raise ServiceError(f"image {image_id} has no mask", status=404)
        try:
            data = session_storage.absolute_path(image.mask_file).read_bytes()
        except FileNotFoundError:
            raise ServiceError(
                f"the mask of image {image_id} is recorded but its file is missing", status=404
            ) from None
        etag = f'"{session_storage.sha256_bytes(data)}"'
        response = HttpResponse(data, content_type="image/png", headers={"ETag": etag})
        # A 304 when If-None-Match names the ETag, else `response` (typed as maybe None).
        return get_conditional_response(request, etag=etag, response=response) or response

    @extend_schema(
        operation_id="session_image_mask_set",
        tags=TAGS,
        summary="Set or replace a training image's mask",
        description="Writes the mask as `<n>/<k>_mask.png` beside the image (a greyscale PNG "
        "of the image's size, atomically) and answers the image as `GET /sessions/<id>` lists "
        "it. 400 naming `mask_base64` for a mask that does not decode, has another aspect "
        "ratio than the image (both sizes named) or is all black; 409 (naming the run) while "
        "a training run of the session is queued or running. Nothing changes on an error.",
        request=SessionImageMaskSerializer,
        responses={200: SessionImageItem, **error_responses(404, 409, 429)},
    )
    def put(self, request: Request, session_id: int, image_id: int) -> Response:
        data = validated(SessionImageMaskSerializer, request)
        image = session_services.training_image_mask_upload(
            session_id, image_id, data["mask_base64"], caller=request_caller(request)
        )
        return rendered(SessionImageItem, bodies.session_image_item(image))

    @extend_schema(
        operation_id="session_image_mask_delete",
        tags=TAGS,
        summary="Remove a training image's mask",
        description="The image then trains whole again; answers the image (`mask_url` null). "
        "404 when it has no mask; 409 (naming the run) while the session trains.",
        responses={200: SessionImageItem, **error_responses(404, 409, with_body=False)},
    )
    def delete(self, request: Request, session_id: int, image_id: int) -> Response:
        image = session_services.training_image_mask_delete(
            session_id, image_id, caller=request_caller(request)
        )
        return rendered(SessionImageItem, bodies.session_image_item(image))


session_image_mask = SessionImageMaskView.as_view()


@honours_idempotency_key
@extend_schema(
    operation_id="delete_session",
    tags=TAGS,
    summary="Delete a session, its files and rows (a running training stops)",
    request=SessionRefSerializer,
    responses={200: DeleteSessionResponse, **error_responses(404)},
)
@api_view(["POST"])
@permission_classes(scope_required("delete"))
def delete_session(request: Request) -> Response:
    data = validated(SessionRefSerializer, request)
    session_services.session_delete(data["session_id"], caller=request_caller(request))
    return rendered(DeleteSessionResponse, {"status": "deleted", "session_id": data["session_id"]})
