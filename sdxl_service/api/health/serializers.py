"""/healthz's body: the overall status and each check's verdict."""

from typing import Any

from rest_framework import serializers


class HealthCheckItem(serializers.Serializer[Any]):
    ok = serializers.BooleanField()
    reason = serializers.CharField(help_text="why, for a person; names no secret")


class HealthChecks(serializers.Serializer[Any]):
    database = HealthCheckItem(help_text="the database answers a query")
    broker = HealthCheckItem(
        help_text="django-q2's broker (the ORM broker in the database, or Redis) is reachable"
    )
    generation_worker = HealthCheckItem(
        help_text="a generation worker's heartbeat is fresh (SDXL_WORKER_STALE_AFTER)"
    )
    training_worker = HealthCheckItem(
        help_text="a training worker's heartbeat is fresh (SDXL_WORKER_STALE_AFTER)"
    )


class HealthResponse(serializers.Serializer[Any]):
    status = serializers.ChoiceField(
        choices=[
            ("ok", "everything is fine"),
            ("degraded", "database and broker are fine, a worker is missing (HTTP 200)"),
            ("down", "the database or the broker fails (HTTP 503)"),
        ]
    )
    checks = HealthChecks()
