"""Issuing API tokens."""

import secrets

from access_app.models import ApiToken
from access_app.selectors import token_sha256

# 32 random bytes: not guessable, and long enough that a plain sha256 is a safe hash
# (no salt or slow hash needed: nobody brute-forces 256 bits).
_TOKEN_BYTES = 32
TOKEN_PREFIX = "sdxl_"


def api_token_issue(token: ApiToken) -> str:
    """Gives an unsaved token row a new secret and saves it; returns the only plaintext copy."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
    token.prefix = plaintext[: len(TOKEN_PREFIX) + 4]
    token.sha256 = token_sha256(plaintext)
    token.save()
    return plaintext
