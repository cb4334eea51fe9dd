"""Session endpoints of API.md: validate, call one service, serialize."""

from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view
from rest_framework.response import Response

from sdxl_service.api import error_responses, validated
from sessions_app import selectors, services
from sessions_app.serializers import (
    CreateSessionResponse,
    DeleteSessionResponse,
    PostSessionImageSerializer,
    SessionRefSerializer,
    SuccessResponse,
)
from training_app.selectors import latest_lora_filenames, latest_runs, training_status_body
from training_app.serializers import ListSessionsResponse

TAG = ["sessions"]


@extend_schema(
    operation_id="create_session",
    tags=TAG,
    summary="Create an empty session",
    responses={200: CreateSessionResponse},
)
@api_view(["GET"])
def create_session(request):
    session = services.session_create()
    return Response({"session_id": session.pk})


@extend_schema(
    operation_id="post_session_image",
    tags=TAG,
    summary="Add one captioned training image (a new group folder)",
    description="PNG, JPEG, WebP or BMP, base64 (a data: URL prefix is accepted). Stored "
    "as `session_<id>/<n>/0.<ext>` with its prompt in `0.txt`.",
    request=PostSessionImageSerializer,
    responses={200: SuccessResponse, **error_responses(404)},
)
@api_view(["POST"])
def post_session_image(request):
    data = validated(PostSessionImageSerializer, request)
    services.session_image_add(data["session_id"], data["image_base64"], data["prompt"])
    return Response({"status": "success"})


@extend_schema(
    operation_id="list_sessions",
    tags=TAG,
    summary="Every session with its latest LoRA, group count and training status",
    responses={200: ListSessionsResponse},
)
@api_view(["GET"])
def list_sessions(request):
    sessions = list(selectors.session_list())
    ids = [session.pk for session in sessions]
    loras = latest_lora_filenames(ids)
    runs = latest_runs(ids)
    return Response(
        {
            "sessions": [
                {
                    "session_id": str(session.pk),
                    "latest_lora": loras.get(session.pk),
                    "image_groups": session.group_count,
                    "training": training_status_body(runs.get(session.pk)),
                }
                for session in sessions
            ]
        }
    )


@extend_schema(
    operation_id="delete_session",
    tags=TAG,
    summary="Delete a session, its files and rows (a running training stops)",
    request=SessionRefSerializer,
    responses={200: DeleteSessionResponse, **error_responses(404)},
)
@api_view(["POST"])
def delete_session(request):
    data = validated(SessionRefSerializer, request)
    services.session_delete(data["session_id"])
    return Response({"status": "deleted", "session_id": str(data["session_id"])})
