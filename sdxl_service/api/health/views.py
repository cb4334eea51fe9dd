"""/healthz: the service's health for load balancers, without a token."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from sdxl_service import health
from sdxl_service.api.health.serializers import HealthResponse

TAGS = ["health"]


@extend_schema(
    operation_id="healthz",
    tags=TAGS,
    summary="Health for load balancers: database, broker, workers (no token needed)",
    description="Needs no token, even with API tokens configured, and reveals nothing "
    "secret (no host, path or URL). `down` (503): the database cannot be queried or the "
    "broker is unreachable: this process cannot serve the API. `degraded` (200): database "
    "and broker are fine but a generation or training worker has no fresh heartbeat (the "
    "web process is healthy; /txt2img answers 503 until a generation worker runs). `ok` "
    "(200): everything is fine.",
    auth=[],
    responses={
        200: OpenApiResponse(HealthResponse, description="ok or degraded"),
        503: OpenApiResponse(HealthResponse, description="down: the database or the broker fails"),
    },
)
@api_view(["GET", "HEAD"])  # load balancers probe with either
@authentication_classes([])
@permission_classes([AllowAny])
def healthz(request: Request) -> Response:
    report = health.service_health()
    response = Response(HealthResponse(report.as_dict()).data, status=report.http_status)
    response["Cache-Control"] = "no-store"
    return response
