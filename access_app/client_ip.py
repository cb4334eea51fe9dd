"""The address a request comes from, as the admin login limit (django-axes) counts it."""

from django.conf import settings
from django.http import HttpRequest


def client_ip(request: HttpRequest) -> str:
    """REMOTE_ADDR, which a client cannot forge. Behind the reverse proxy
    (DJANGO_BEHIND_PROXY) that is the proxy's own address for everyone, so the address is
    the last one in X-Forwarded-For: the one the proxy appended itself (anything before it
    is the client's to write)."""
    remote: str = request.META.get("REMOTE_ADDR", "")
    if not settings.SDXL_BEHIND_PROXY:
        return remote
    forwarded = [
        address.strip()
        for address in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")
        if address.strip()
    ]
    return forwarded[-1] if forwarded else remote
