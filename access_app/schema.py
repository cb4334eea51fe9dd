"""How the OpenAPI description presents the API's bearer tokens."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "access_app.authentication.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "Required on every endpoint once any API token exists "
            "(SDXL_API_TOKENS or the admin); without one the API is open on loopback only.",
        }
