"""How the OpenAPI description presents the API's bearer tokens."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "access_app.authentication.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "Required on every endpoint once any API token exists "
            "(SDXL_API_TOKENS, create_token or the admin); without one the API is open on "
            "loopback only. A token belongs to an owner and sees only the owner's sessions, "
            "LoRAs and generations (another owner's answer 404, as if missing); its scopes "
            "(read, upload, train, generate, delete, admin) decide which endpoints it may "
            "call (403 otherwise; each operation names its scope); `admin` holds every "
            "scope and sees every owner's. Owners' quotas answer 429.",
        }
