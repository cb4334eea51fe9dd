"""The front door (/): what the service is, where its documentation and admin are, and its
health, for a person. Plain HTML, nothing loaded from elsewhere, no JavaScript.

It needs no token, even with API tokens configured: it shows what /healthz answers (ok or
not, and why, naming no secret) and links to pages that are open anyway; everything that
reads or changes sessions stays behind the API's token.
"""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from access_app.selectors import api_tokens_configured
from sdxl_service import health

_LABELS = {
    "database": "Database",
    "broker": "Broker (django-q2)",
    "generation_worker": "Generation worker",
    "training_worker": "Training worker",
}


@require_safe
def front_door(request: HttpRequest) -> HttpResponse:
    report = health.service_health()
    try:
        tokens = api_tokens_configured()
    except Exception:  # the database is down: the health table says so
        tokens = bool(settings.SDXL_API_TOKENS)
    context = {
        "health": report,
        "checks": [
            {"name": name, "label": _LABELS[name], "ok": check.ok, "reason": check.reason}
            for name, check in report.checks.items()
        ],
        "tokens_configured": tokens,
        "title": settings.SPECTACULAR_SETTINGS["TITLE"],
    }
    return render(request, "sdxl_service/front_door.html", context, status=report.http_status)
