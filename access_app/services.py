"""Issuing and revoking API tokens, and creating owners."""

import secrets

from django.db import transaction

from access_app.models import DEFAULT_SCOPES, SCOPES, ApiToken, Owner
from access_app.selectors import default_owner, token_sha256
from core.errors import ServiceError

# 32 random bytes: not guessable, and long enough that a plain sha256 is a safe hash
# (no salt or slow hash needed: nobody brute-forces 256 bits).
_TOKEN_BYTES = 32
TOKEN_PREFIX = "sdxl_"


def scopes_checked(scopes: list[str] | tuple[str, ...] | None) -> list[str]:
    """`scopes` in SCOPES' order, duplicates dropped; None: DEFAULT_SCOPES."""
    if scopes is None:
        return list(DEFAULT_SCOPES)
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ServiceError(f"unknown scopes: {', '.join(unknown)} (known: {', '.join(SCOPES)})")
    if not scopes:
        raise ServiceError(f"give a token at least one scope of: {', '.join(SCOPES)}")
    return [scope for scope in SCOPES if scope in scopes]


def api_token_issue(token: ApiToken) -> str:
    """Gives an unsaved token row a new secret and saves it; returns the only plaintext copy."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    token.prefix = plaintext[: len(TOKEN_PREFIX) + 4]
    token.sha256 = token_sha256(plaintext)
    token.scopes = scopes_checked(token.scopes or None)
    token.save()
    return plaintext


def api_token_create(
    owner_name: str, name: str, scopes: list[str] | None = None
) -> tuple[ApiToken, str]:
    """A new token of the owner named `owner_name` (created if new); the plaintext is
    returned once, only its hash is kept."""
    checked = scopes_checked(scopes)
    with transaction.atomic():
        owner = owner_named(owner_name)
        token = ApiToken(name=name or owner.name, owner=owner, scopes=checked)
        plaintext = api_token_issue(token)
    return token, plaintext


def owner_named(name: str | None) -> Owner:
    """The owner called `name`, created if new; the default owner for None."""
    if name is None:
        return default_owner()
    if not name.strip():
        raise ServiceError("an owner needs a name")
    owner, _ = Owner.objects.get_or_create(name=name.strip())
    return owner


def api_token_revoke(prefix_or_id: str) -> ApiToken:
    """Deletes the one token whose prefix (or id) this is: it stops working at once."""
    tokens = ApiToken.objects.select_related("owner")
    if prefix_or_id.isdigit():
        matching = list(tokens.filter(pk=int(prefix_or_id)))
    else:
        matching = list(tokens.filter(prefix=prefix_or_id))
    if not matching:
        raise ServiceError(f"no API token {prefix_or_id!r} (list_tokens shows them)", status=404)
    if len(matching) > 1:
        ids = ", ".join(str(token.pk) for token in matching)
        raise ServiceError(
            f"{len(matching)} tokens start with {prefix_or_id!r}: give an id ({ids})"
        )
    (token,) = matching
    token.delete()
    return token
