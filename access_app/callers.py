"""Who calls the API: the `request.user` of every API request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from access_app.models import SCOPES

if TYPE_CHECKING:
    # Not at run time: DRF imports this module (UNAUTHENTICATED_USER) while it loads.
    from rest_framework.request import Request


@dataclass(frozen=True)
class Caller:
    """A token's holder: its owner (None: the default owner), its scopes, and whether it
    sees every owner's sessions (an admin token)."""

    name: str
    owner_id: int | None
    scopes: frozenset[str]
    is_authenticated: bool = True

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def may(self, scope: str) -> bool:
        return scope in self.scopes or self.is_admin


# With no API token configured the API is open on loopback (README, Security): the one
# local user may do everything, and what they create belongs to the default owner.
OPEN_CALLER = Caller(
    name="open API (no token configured)",
    owner_id=None,
    scopes=frozenset(SCOPES),
    is_authenticated=False,
)


def open_caller() -> Caller:
    """DRF's UNAUTHENTICATED_USER (settings): without a token, the caller of the open API.
    When tokens are configured a request without one never gets past the permission."""
    return OPEN_CALLER


def request_caller(request: Request) -> Caller:
    """`request.user` of an API request, which is always a Caller: set by
    BearerTokenAuthentication, else by open_caller (DRF's types say a Django user)."""
    caller: object = request.user
    if not isinstance(caller, Caller):
        raise TypeError(f"request.user is {caller!r}, not an API caller")
    return caller
