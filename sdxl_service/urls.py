from django.contrib import admin
from django.urls import path
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

from sdxl_service.api import endpoint
from sessions_app import views as session_views
from training_app import views as training_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/redoc", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    *endpoint("create_session", session_views.create_session),
    *endpoint("post_session_image", session_views.post_session_image),
    *endpoint("list_sessions", session_views.list_sessions),
    *endpoint("delete_session", session_views.delete_session),
    *endpoint("train_lora", training_views.train_lora),
    *endpoint("train_status", training_views.train_status),
    *endpoint("cancel_training", training_views.cancel_training),
    *endpoint("get_lora", training_views.get_lora),
    *endpoint("upload_lora", training_views.upload_lora),
    *endpoint("txt2img", training_views.txt2img),
]

handler400 = "sdxl_service.errors.json_bad_request"
handler404 = "sdxl_service.errors.json_not_found"
handler500 = "sdxl_service.errors.json_server_error"
