"""Whether a request's client is still there: the ASGI server (sdxl_service.web_server)
gives each request an event, set once the client has closed its connection."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django.http import HttpRequest
    from rest_framework.request import Request

# The ASGI scope's key for the request's event (a threading.Event).
CLIENT_GONE = "sdxl.client_gone"


def client_gone_event(request: Request | HttpRequest) -> threading.Event | None:
    """The event set once the request's client has disconnected; None where the server
    does not tell (the test client, WSGI)."""
    scope = getattr(request, "scope", None)
    return None if scope is None else scope.get(CLIENT_GONE)
