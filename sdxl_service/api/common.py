"""What every endpoint module shares: checking a request body (unknown fields refused),
rendering an answer, and the webhook fields of the requests that start a job."""

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from sdxl_service.api.field_aliases import shown, unknown_field_message
from sdxl_service.api.fields import ChoiceField, StringField
from training_app.services.webhooks import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS


class WebhookFields(serializers.Serializer[Any]):
    """Where a job posts its events (docs/api.md: Webhooks)."""

    webhook_url = StringField(
        max_length=2000,
        required=False,
        allow_null=True,
        help_text="an http(s) URL on a host the operator allows (SDXL_WEBHOOK_ALLOWED_HOSTS) "
        "that gets each event as a signed JSON POST",
    )
    webhook_events = serializers.ListField(
        child=ChoiceField(choices=WEBHOOK_EVENTS),
        required=False,
        help_text=f"which events to post; left out (or empty): {', '.join(DEFAULT_WEBHOOK_EVENTS)}",
    )

    @staticmethod
    def webhook(validated: dict[str, Any]) -> dict[str, Any]:
        return {
            "webhook_url": validated.get("webhook_url"),
            "webhook_events": validated.get("webhook_events"),
        }


def validated(
    serializer_class: type[serializers.Serializer[Any]], request: Request
) -> dict[str, Any]:
    """The request body (JSON or multipart form) checked by `serializer_class`; a 400
    naming each bad field otherwise, and each field the serializer does not know."""
    return _checked(serializer_class, request.data)


def validated_query(
    serializer_class: type[serializers.Serializer[Any]], request: Request
) -> dict[str, Any]:
    """The query string checked by `serializer_class`, as `validated` checks a body (DRF's
    `?format=` is left to DRF)."""
    query = {
        key: value
        for key, value in request.query_params.items()
        if key != api_settings.URL_FORMAT_OVERRIDE
    }
    return _checked(serializer_class, query)


def _checked(serializer_class: type[serializers.Serializer[Any]], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    unknown = unknown_fields(serializer, data)
    if unknown:
        # Every problem at once: the unknown fields first, then the fields' own.
        serializer.is_valid()
        raise serializers.ValidationError(_merged(unknown, serializer.errors))
    serializer.is_valid(raise_exception=True)
    checked: dict[str, Any] = serializer.validated_data
    return checked


def unknown_fields(serializer: serializers.Serializer[Any], data: object) -> dict[Any, Any]:
    """The fields of `data` that `serializer` (and the serializers nested in it: an object
    field, each entry of a list of objects) does not take, as DRF's error detail:
    {"cfg_scale": [message]}, {"loras": {0: {"weight": [message]}}}. Empty when all are
    known, or when `data` is not an object (the serializer refuses that itself)."""
    if not isinstance(data, Mapping):
        return {}
    fields = {name: f for name, f in serializer.fields.items() if not f.read_only}
    context = getattr(serializer, "field_alias_context", None)
    found: dict[Any, Any] = {}
    for name in data:
        field = fields.get(name)
        if field is None:
            found[shown(name)] = [unknown_field_message(name, list(fields), context)]
            continue
        nested = _nested_unknown(field, data[name])
        if nested:
            found[name] = nested
    return found


def _nested_unknown(field: serializers.Field[Any, Any, Any, Any], value: object) -> dict[Any, Any]:
    if isinstance(field, serializers.Serializer):
        return unknown_fields(field, value)
    child = None
    if isinstance(field, serializers.ListSerializer | serializers.ListField):
        child = field.child
    if not isinstance(child, serializers.Serializer) or not isinstance(value, list):
        return {}
    found: dict[Any, Any] = {}
    for index, item in enumerate(value):
        nested = unknown_fields(child, item)
        if nested:
            found[index] = nested
    return found


def _merged(first: Any, second: Any) -> Any:
    """Two error details in one; where both hold something other than objects, `first`."""
    if isinstance(first, dict) and isinstance(second, dict):
        merged = dict(first)
        for key, value in second.items():
            merged[key] = _merged(first[key], value) if key in first else value
        return merged
    return first


def rendered(
    serializer_class: type[serializers.BaseSerializer[Any]], body: dict[str, Any]
) -> Response:
    """`body` as `serializer_class` renders it: only what the schema describes goes out."""
    return Response(serializer_class(body).data)
