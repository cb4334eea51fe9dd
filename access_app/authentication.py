"""`Authorization: Bearer <token>` for the API (the admin keeps Django's own login)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework import authentication, exceptions

from access_app.callers import Caller
from access_app.selectors import api_token_caller, api_tokens_configured

if TYPE_CHECKING:
    from rest_framework.request import Request


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Caller, str] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header or not api_tokens_configured():
            return None  # the permission decides whether a token was needed
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != self.keyword.lower() or not token:
            raise exceptions.AuthenticationFailed(
                "the Authorization header must read 'Bearer <token>'"
            )
        caller = api_token_caller(token)
        if caller is None:
            raise exceptions.AuthenticationFailed("the API token is not valid")
        return caller, token

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (with this challenge) rather than 403.
        return f'{self.keyword} realm="api"'
