from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework import exceptions
from rest_framework.permissions import BasePermission

from access_app.callers import request_caller
from access_app.selectors import api_tokens_configured

if TYPE_CHECKING:
    # Not at run time: DRF imports this module while importing rest_framework.views.
    from rest_framework.request import Request
    from rest_framework.views import APIView


class ApiTokenWhenConfigured(BasePermission):
    """Open while no API token exists (`serve` then binds to loopback); else a token is needed."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if request.auth is not None or not api_tokens_configured():
            return True
        # Raised here rather than returning False: DRF's own 401 would not say what to send.
        raise exceptions.NotAuthenticated(
            "this API needs a token: send 'Authorization: Bearer <token>'"
        )


def scope_required(scope: str) -> list[type[BasePermission]]:
    """A view's permission classes: a token (when configured) holding `scope` (or admin)."""

    class HoldsScope(BasePermission):
        required_scope = scope  # read by the OpenAPI description (access_app.schema)

        def has_permission(self, request: Request, view: APIView) -> bool:
            if request_caller(request).may(scope):
                return True
            raise exceptions.PermissionDenied(
                f"this API token lacks the '{scope}' scope this endpoint needs"
            )

    HoldsScope.__name__ = HoldsScope.__qualname__ = f"Holds{scope.title()}Scope"
    return [ApiTokenWhenConfigured, HoldsScope]
