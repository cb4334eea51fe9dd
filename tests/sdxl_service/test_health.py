"""The service's health (sdxl_service.health) and /healthz, which load balancers poll."""

from contextlib import contextmanager

import pytest
from django.db import OperationalError, connection
from django.utils import timezone
from rest_framework.test import APIClient

from sdxl_service import health
from training_app.models import WorkerHeartbeat

pytestmark = pytest.mark.django_db
SECRET = "hunter2@db.internal.example"


@pytest.fixture
def training_worker(settings):
    settings.SDXL_WORKER_STALE_AFTER = 3600
    return WorkerHeartbeat.objects.create(
        queue=settings.TRAINING_QUEUE,
        host="test",
        pid=2,
        started_at=timezone.now(),
        last_seen=timezone.now(),
    )


@contextmanager
def database_refusing_queries():
    """Every query on this connection fails as an unreachable server's would, with a
    message naming a host and a password."""

    def refuse(execute, sql, params, many, context):
        raise OperationalError(f"could not connect to server {SECRET}")

    with connection.execute_wrapper(refuse):
        yield


def test_all_fine_is_ok(generation_worker, training_worker):
    report = health.service_health()
    assert report.status == "ok" and report.http_status == 200
    assert list(report.checks) == list(health.CHECK_NAMES)
    assert all(check.ok for check in report.checks.values())
    assert "answers queries" in report.checks["database"].reason
    assert "reachable" in report.checks["broker"].reason


def test_a_missing_worker_is_degraded_but_still_200(generation_worker):
    report = health.service_health()
    assert (report.status, report.http_status) == ("degraded", 200)
    assert report.checks["generation_worker"].ok
    training = report.checks["training_worker"]
    assert not training.ok and "no heartbeat" in training.reason


def test_a_stale_heartbeat_counts_as_gone(generation_worker, settings):
    settings.SDXL_WORKER_STALE_AFTER = 15
    generation_worker.last_seen = timezone.now() - timezone.timedelta(seconds=60)
    generation_worker.save()
    check = health.service_health().checks["generation_worker"]
    assert not check.ok and "/txt2img answers 503" in check.reason


def test_a_database_that_cannot_be_queried_is_down_with_503(generation_worker):
    with database_refusing_queries():
        report = health.service_health()
    assert (report.status, report.http_status) == ("down", 503)
    database = report.checks["database"]
    assert not database.ok and database.reason == "cannot be queried (OperationalError)"
    assert report.checks["generation_worker"].reason.startswith("unknown")
    assert SECRET not in str(report.as_dict())


def test_an_unreachable_broker_is_down(monkeypatch, generation_worker, training_worker):
    import django_q.brokers

    def unreachable(list_key=None):
        raise ConnectionError(f"Error 111 connecting to redis://:{SECRET}:6379")

    monkeypatch.setattr(django_q.brokers, "get_broker", unreachable)
    report = health.service_health()
    assert (report.status, report.http_status) == ("down", 503)
    broker = report.checks["broker"]
    assert not broker.ok and "not reachable (ConnectionError)" in broker.reason
    assert SECRET not in broker.reason
    assert report.checks["database"].ok


def test_healthz_answers_json_without_a_token(settings, generation_worker, training_worker):
    settings.SDXL_API_TOKENS = ["secret-token"]
    client = APIClient()
    assert client.get("/list_sessions").status_code == 401  # the API itself needs one
    response = client.get("/healthz")
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == set(health.CHECK_NAMES)
    assert all(set(check) == {"ok", "reason"} for check in body["checks"].values())
    assert "secret-token" not in response.content.decode()
    # A load balancer's stray or wrong header is no reason to fail the check.
    wrong = client.get("/healthz/", HTTP_AUTHORIZATION="Bearer wrong")
    assert wrong.status_code == 200
    assert client.head("/healthz").status_code == 200


def test_healthz_is_503_when_the_database_is_down():
    client = APIClient()
    with database_refusing_queries():
        response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down" and body["checks"]["database"]["ok"] is False
    assert SECRET not in response.content.decode()


def test_healthz_is_in_the_schema_without_security():
    schema_document = APIClient().get("/api/schema", {"format": "json"}).json()
    assert set(schema_document["paths"]["/healthz"]) == {"get"}
    operation = schema_document["paths"]["/healthz"]["get"]
    assert set(operation["responses"]) == {"200", "405", "503"}
    assert operation.get("security", []) in ([], [{}])
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    response = schema_document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(response["properties"]) == {"status", "checks"}
