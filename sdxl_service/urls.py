from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

from sdxl_service import admin as session_admin  # noqa: F401 (registers the session page)
from sdxl_service.views import front_door

urlpatterns = [
    path("", front_door, name="front-door"),
    path("admin/", admin.site.urls),
    path("api/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/redoc", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("", include("sdxl_service.api.urls")),
]

handler400 = "sdxl_service.api.errors.json_bad_request"
handler404 = "sdxl_service.api.errors.json_not_found"
handler500 = "sdxl_service.api.errors.json_server_error"
