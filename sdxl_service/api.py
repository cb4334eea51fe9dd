"""Small helpers the API views share."""

from django.urls import path


def validated(serializer_class, request) -> dict:
    """The request body checked by `serializer_class`; a 400 naming the field otherwise."""
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def endpoint(route: str, view):
    """`route` with and without a trailing slash, both served directly.

    API.md: clients POST JSON, and a redirect to the slashed form would lose the body.
    """
    return [path(route, view), path(f"{route}/", view)]
