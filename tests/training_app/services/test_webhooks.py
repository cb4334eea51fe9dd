"""Webhooks: who may be called, what is posted and signed, retries, and the events of runs
and generations."""

import hashlib
import hmac
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from core.errors import ServiceError
from sessions_app import services as session_services
from tests.helpers import image_bytes
from training_app.models import Generation, TrainingRun, WebhookDelivery
from training_app.services import runs, webhooks
from training_app.services.generations import batches, lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.django_db
SECRET = "webhook-secret-for-tests"


class Receiver:
    """A local HTTP server that records what it is sent and answers `answers` in turn
    (then 200)."""

    def __init__(self):
        self.received: list[dict] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://127.0.0.2:9/elsewhere")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(request["body"])["event"] for request in self.received]


@pytest.fixture
def receiver(settings):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.SDXL_WEBHOOK_SECRET = SECRET
    settings.SDXL_WEBHOOK_ALLOW_PRIVATE = True  # the receiver listens on loopback
    server = Receiver()
    yield server
    server.server.shutdown()


@pytest.mark.parametrize(
    ("hosts", "secret", "url", "message"),
    [
        ([], SECRET, "http://hooks.example.com/x", "webhooks are off"),
        (["hooks.example.com"], "", "http://hooks.example.com/x", "webhooks are off"),
        (["hooks.example.com"], SECRET, "http://evil.example.com/x", "host evil.example.com"),
        (["hooks.example.com"], SECRET, "http://169.254.169.254/latest", "is not in"),
        (["hooks.example.com"], SECRET, "ftp://hooks.example.com/x", "http:// or https://"),
        (["hooks.example.com"], SECRET, "http://u:p@hooks.example.com/", "credentials"),
        (["hooks.example.com"], SECRET, "http://hooks.example.com:x/", "is not a URL"),
        ([".example.com"], SECRET, "http://example.com.evil.net/", "is not in"),
    ],
)
def test_only_allowed_hosts_can_be_targets(settings, hosts, secret, url, message):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS, settings.SDXL_WEBHOOK_SECRET = hosts, secret
    with pytest.raises(ServiceError, match=message) as error:
        webhooks.webhook_target_check(url, None)
    assert error.value.status == 400


def test_allowed_targets_and_default_events(settings):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com", ".example.org"]
    settings.SDXL_WEBHOOK_SECRET = SECRET
    assert webhooks.webhook_target_check("https://hooks.example.com/a", None) == (
        "https://hooks.example.com/a",
        ["completed", "failed"],
    )
    assert webhooks.webhook_target_check("http://ci.example.org:8080/b", ["progress"])[1] == [
        "progress"
    ]
    assert webhooks.webhook_target_check(None, None) == ("", [])
    with pytest.raises(ServiceError, match="webhook_events needs a webhook_url"):
        webhooks.webhook_target_check(None, ["completed"])


def _run_with_webhook(url: str, events: list[str]) -> TrainingRun:
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes("PNG", (64, 64)), "red")
    return runs.training_run_start(
        session.pk,
        {"steps": 2, "resolution": 64, "sample_every": 1, "checkpoint_every": 1},
        webhook_url=url,
        webhook_events=events,
    )


def test_a_training_run_posts_each_event_it_asked_for_signed(receiver):
    run = _run_with_webhook(receiver.url, list(webhooks.WEBHOOK_EVENTS))

    runs.training_run_execute(run.pk)
    # Recorded by the worker as they happen; nothing is sent until a delivery round.
    assert receiver.received == []
    assert webhooks.webhooks_deliver_due() == WebhookDelivery.objects.count()

    events = receiver.events()
    assert events[0] == "started" and events[-1] == "completed"
    assert {"progress", "sample", "checkpoint"} <= set(events)
    last = receiver.received[-1]
    body = json.loads(last["body"])
    assert (body["type"], body["id"]) == ("training", run.pk)
    assert body["data"]["status"] == "completed" and body["data"]["lora"] == "lora_1.safetensors"
    timestamp = last["headers"]["X-SDXL-Timestamp"]
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + last["body"], hashlib.sha256)
    assert last["headers"]["X-SDXL-Signature"] == f"sha256={expected.hexdigest()}"
    assert last["headers"]["X-SDXL-Event"] == "completed"
    assert set(WebhookDelivery.objects.values_list("status", flat=True)) == {"delivered"}


def test_a_cancelled_run_posts_failed_and_only_the_events_asked_for(receiver):
    run = _run_with_webhook(receiver.url, ["failed"])
    runs.training_run_cancel(run.session_id)
    webhooks.webhooks_deliver_due()
    assert receiver.events() == ["failed"]
    data = json.loads(receiver.received[0]["body"])["data"]
    assert (data["status"], data["message"]) == ("cancelled", "training was cancelled")


def test_refused_deliveries_are_retried_with_back_off_then_given_up(receiver, settings):
    settings.SDXL_WEBHOOK_MAX_ATTEMPTS = 3
    run = _run_with_webhook(receiver.url, ["failed"])
    receiver.answers = [500, 503, 500]
    runs.training_run_cancel(run.session_id)
    delivery = WebhookDelivery.objects.get()

    for attempt, delay in ((1, 5), (2, 20)):
        before = timezone.now()
        webhooks.webhooks_deliver_due()
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts) == ("pending", attempt)
        assert delivery.last_error.startswith("answered 5")
        assert delivery.next_attempt_at >= before + timedelta(seconds=delay)
        assert webhooks.webhooks_deliver_due() == 0  # not due yet
        WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    webhooks.webhooks_deliver_due()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 3, 500)
    assert len(receiver.received) == 3


def test_a_redirect_is_not_followed(receiver):
    run = _run_with_webhook(receiver.url, ["failed"])
    receiver.answers = [302]
    runs.training_run_cancel(run.session_id)
    webhooks.webhooks_deliver_due()
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.last_error) == ("pending", "answered 302")
    assert len(receiver.received) == 1


def test_a_host_no_longer_allowed_is_not_called(receiver, settings):
    run = _run_with_webhook(receiver.url, ["failed"])
    runs.training_run_cancel(run.session_id)
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    webhooks.webhooks_deliver_due()
    delivery = WebhookDelivery.objects.get()
    assert (
        delivery.status == "failed" and "not in SDXL_WEBHOOK_ALLOWED_HOSTS" in delivery.last_error
    )
    assert receiver.received == []


def test_a_generation_posts_started_progress_and_completed(receiver, generation_worker):
    generation = generation_request(
        GenerationRequest(
            prompt="x",
            height=64,
            width=64,
            steps=5,
            webhook_url=receiver.url,
            webhook_events=("started", "progress", "completed"),
        )
    )
    batches.generation_execute(generation.pk)
    webhooks.webhooks_deliver_due()

    assert receiver.events() == ["started"] + ["progress"] * 5 + ["completed"]
    done = json.loads(receiver.received[-1]["body"])["data"]
    assert done["status"] == "completed"
    assert done["image_urls"] == [f"/generations/{generation.pk}/0.png"]


def test_a_generation_that_fails_posts_failed(receiver, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", webhook_url=receiver.url))
    Generation.objects.filter(pk=generation.pk).update(status="running")
    lifecycle.generations_finish_with_error([generation.pk], "the worker was lost")
    webhooks.webhooks_deliver_due()
    assert receiver.events() == ["failed"]
    assert json.loads(receiver.received[0]["body"])["data"]["message"] == "the worker was lost"


def test_a_cancelled_generation_posts_failed_with_status_cancelled(receiver, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", webhook_url=receiver.url))
    lifecycle.generation_cancel(generation.pk)
    lifecycle.generation_cancel(generation.pk)  # already ended: no second event
    webhooks.webhooks_deliver_due()
    assert receiver.events() == ["failed"]
    data = json.loads(receiver.received[0]["body"])["data"]
    assert (data["status"], data["message"]) == ("cancelled", lifecycle.CANCELLED_BY_REQUEST)
