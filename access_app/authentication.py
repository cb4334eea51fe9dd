"""`Authorization: Bearer <token>` for the API (the admin keeps Django's own login)."""

from dataclasses import dataclass

from rest_framework import authentication, exceptions

from access_app.selectors import api_token_owner, api_tokens_configured


@dataclass(frozen=True)
class ApiCaller:
    """The `request.user` of an API request that presented a valid token."""

    name: str
    is_authenticated: bool = True


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header or not api_tokens_configured():
            return None  # the permission decides whether a token was needed
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != self.keyword.lower() or not token:
            raise exceptions.AuthenticationFailed(
                "the Authorization header must read 'Bearer <token>'"
            )
        owner = api_token_owner(token)
        if owner is None:
            raise exceptions.AuthenticationFailed("the API token is not valid")
        return ApiCaller(owner), token

    def authenticate_header(self, request):
        # Makes DRF answer 401 (with this challenge) rather than 403.
        return f'{self.keyword} realm="api"'
