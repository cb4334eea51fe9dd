"""The API's routes: the nine endpoints of the original service and this one's additions."""

from collections.abc import Callable

from django.http.response import HttpResponseBase
from django.urls import URLPattern, path

from sdxl_service.api.events import views as events
from sdxl_service.api.generation import views as generation
from sdxl_service.api.health import views as health
from sdxl_service.api.loras import views as loras
from sdxl_service.api.sessions import views as sessions
from sdxl_service.api.training import views as training


def endpoint(
    route: str, view: Callable[..., HttpResponseBase], name: str | None = None
) -> list[URLPattern]:
    """`route` with and without a trailing slash, both served directly; `name` (for
    reverse) is the unslashed one's.

    docs/api.md: clients POST JSON, and a redirect to the slashed form would lose the body.
    """
    return [path(route, view, name=name), path(f"{route}/", view)]


urlpatterns = [
    *endpoint("create_session", sessions.create_session),
    *endpoint("post_session_image", sessions.post_session_image),
    *endpoint("list_sessions", sessions.list_sessions),
    *endpoint("delete_session", sessions.delete_session),
    *endpoint("train_lora", training.train_lora),
    *endpoint("train_status", training.train_status),
    *endpoint("cancel_training", training.cancel_training),
    *endpoint("get_lora", loras.get_lora),
    *endpoint("upload_lora", loras.upload_lora),
    *endpoint("txt2img", generation.txt2img),
    *endpoint("sessions/<int:session_id>", sessions.session_detail, name="session"),
    *endpoint("sessions/<int:session_id>/images", sessions.session_images_upload),
    *endpoint("sessions/<int:session_id>/masks", sessions.session_masks),
    *endpoint("sessions/<int:session_id>/captions", sessions.session_captions_create),
    path(
        "sessions/<int:session_id>/images/<int:image_id>",
        sessions.session_image,
        name="session-image",
    ),
    path(
        "sessions/<int:session_id>/images/<int:image_id>/mask",
        sessions.session_image_mask,
        name="session-image-mask",
    ),
    path(
        "sessions/<int:session_id>/loras/<str:lora_filename>",
        loras.lora_file,
        name="session-lora",
    ),
    *endpoint("generations/<int:generation_id>", generation.generation_status, name="generation"),
    *endpoint(
        "generations/<int:generation_id>/cancel",
        generation.generation_cancel,
        name="generation-cancel",
    ),
    path(
        "generations/<int:generation_id>/<int:index>.<str:extension>",
        generation.generation_image,
        name="generation-image",
    ),
    # Under `serve` its web server streams these two itself (sdxl_service.event_streams).
    *endpoint("runs/<int:run_id>/events", events.run_events, name="run-events"),
    *endpoint(
        "generations/<int:generation_id>/events",
        events.generation_events,
        name="generation-events",
    ),
    *endpoint("healthz", health.healthz),
    path("training_samples/<int:sample_id>.png", training.training_sample, name="training-sample"),
]
