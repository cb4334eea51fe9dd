"""What every endpoint module shares: checking a request body, rendering an answer, and
the webhook fields of the requests that start a job."""

from typing import Any

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from sdxl_service.api.fields import StringField
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
        child=serializers.ChoiceField(choices=WEBHOOK_EVENTS),
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
    """The request body checked by `serializer_class`; a 400 naming the field otherwise."""
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    data: dict[str, Any] = serializer.validated_data
    return data


def rendered(
    serializer_class: type[serializers.BaseSerializer[Any]], body: dict[str, Any]
) -> Response:
    """`body` as `serializer_class` renders it: only what the schema describes goes out."""
    return Response(serializer_class(body).data)
