"""Session endpoints of API.md: validate, call one service, serialize."""

from rest_framework.decorators import api_view
from rest_framework.response import Response

from sdxl_service.api import validated
from sessions_app import selectors, services
from sessions_app.serializers import PostSessionImageSerializer, SessionRefSerializer
from training_app.selectors import latest_lora_filenames, latest_runs, training_status_body


@api_view(["GET"])
def create_session(request):
    session = services.session_create()
    return Response({"session_id": session.pk})


@api_view(["POST"])
def post_session_image(request):
    data = validated(PostSessionImageSerializer, request)
    services.session_image_add(data["session_id"], data["image_base64"], data["prompt"])
    return Response({"status": "success"})


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


@api_view(["POST"])
def delete_session(request):
    data = validated(SessionRefSerializer, request)
    services.session_delete(data["session_id"])
    return Response({"status": "deleted", "session_id": str(data["session_id"])})
