"""Whether API tokens are in force, and whom a token belongs to."""

import hashlib
import hmac

from django.conf import settings

from access_app.models import ApiToken


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def api_tokens_configured() -> bool:
    return bool(settings.SDXL_API_TOKENS) or ApiToken.objects.exists()


def api_token_owner(token: str) -> str | None:
    """The name of whoever holds `token`, or None when it is no valid token."""
    digest = token_sha256(token)
    for index, configured in enumerate(settings.SDXL_API_TOKENS):
        # Comparing digests in constant time: the environment's tokens are plaintext.
        if hmac.compare_digest(digest, token_sha256(configured)):
            return f"SDXL_API_TOKENS[{index}]"
    stored = ApiToken.objects.filter(sha256=digest).values_list("name", flat=True).first()
    return f"API token {stored!r}" if stored is not None else None
