"""The API's routes: the nine endpoints of the original service and this one's additions."""

from django.urls import path

from sdxl_service.api import views


def endpoint(route: str, view, name: str | None = None):
    """`route` with and without a trailing slash, both served directly; `name` (for
    reverse) is the unslashed one's.

    docs/api.md: clients POST JSON, and a redirect to the slashed form would lose the body.
    """
    return [path(route, view, name=name), path(f"{route}/", view)]


urlpatterns = [
    *endpoint("create_session", views.create_session),
    *endpoint("post_session_image", views.post_session_image),
    *endpoint("list_sessions", views.list_sessions),
    *endpoint("delete_session", views.delete_session),
    *endpoint("train_lora", views.train_lora),
    *endpoint("train_status", views.train_status),
    *endpoint("cancel_training", views.cancel_training),
    *endpoint("get_lora", views.get_lora),
    *endpoint("upload_lora", views.upload_lora),
    *endpoint("txt2img", views.txt2img),
    *endpoint("sessions/<int:session_id>", views.session_detail, name="session"),
    *endpoint("sessions/<int:session_id>/images", views.session_images_upload),
    path(
        "sessions/<int:session_id>/images/<int:image_id>",
        views.session_image,
        name="session-image",
    ),
    *endpoint("generations/<int:generation_id>", views.generation_status, name="generation"),
    *endpoint(
        "generations/<int:generation_id>/cancel",
        views.generation_cancel,
        name="generation-cancel",
    ),
    path(
        "generations/<int:generation_id>/<int:index>.<str:extension>",
        views.generation_image,
        name="generation-image",
    ),
    *endpoint("healthz", views.healthz),
    path("training_samples/<int:sample_id>.png", views.training_sample, name="training-sample"),
]
