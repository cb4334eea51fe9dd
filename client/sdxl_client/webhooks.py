"""Checking the signature the service puts on each webhook it sends.

The service signs `"<X-SDXL-Timestamp>.<raw body>"` with HMAC-SHA256 under
SDXL_WEBHOOK_SECRET and sends `X-SDXL-Signature: sha256=<hex>` (docs/api.md, Webhooks).
"""

import hashlib
import hmac
import time
from collections.abc import Mapping

SIGNATURE_HEADER = "X-SDXL-Signature"
TIMESTAMP_HEADER = "X-SDXL-Timestamp"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float | None = None,
) -> bool:
    """True when `body` came signed with `secret`. With `tolerance_s`, also only when its
    timestamp is within that many seconds of now (a replayed old delivery is refused);
    retries of one delivery are re-signed with a fresh timestamp, so a tolerance of a few
    minutes refuses no genuine one."""
    signature = _header(headers, SIGNATURE_HEADER)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    if not signature or not timestamp:
        return False
    if tolerance_s is not None:
        try:
            if abs(time.time() - int(timestamp)) > tolerance_s:
                return False
        except ValueError:
            return False
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(signature, "sha256=" + digest.hexdigest())
