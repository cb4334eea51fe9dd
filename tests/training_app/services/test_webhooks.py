"""Webhooks: who may be called, what is posted and signed, retries, and the events of runs
and generations."""

import hashlib
import hmac
import ipaddress
import itertools
import json
import socket
import threading
import time
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
    """A local HTTP server (on `host`, a loopback address, and `port`, any free one unless
    given) that records what it is sent and answers `answers` in turn (then 200)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
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

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(request["body"])["event"] for request in self.received]


class Tarpit:
    """A local server that answers every connection one byte of a status line every
    `pause` seconds and never finishes; counts the connections it holds."""

    def __init__(self, pause: float):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.pause, self.held, self.stopped = pause, 0, threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:  # stopped
                return
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket):
        self.held += 1
        with connection:
            connection.recv(65536)
            for byte in itertools.cycle(b"HTTP/1.1 200 OK "):
                if self.stopped.wait(self.pause):
                    return
                try:
                    connection.send(bytes([byte]))
                except OSError:  # the client gave up
                    return

    def stop(self):
        self.stopped.set()
        self.listener.close()


def deliver_due() -> int:
    """Sends the due deliveries one after another, as the worker's threads claim them;
    how many were attempted."""
    attempted = 0
    while claimed := webhooks.webhooks_claim_due(1):
        webhooks.webhook_deliver(claimed[0])
        attempted += 1
    return attempted


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
    assert deliver_due() == WebhookDelivery.objects.count()

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
    deliver_due()
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
        deliver_due()
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts) == ("pending", attempt)
        assert delivery.last_error.startswith("answered 5")
        assert delivery.next_attempt_at >= before + timedelta(seconds=delay)
        assert deliver_due() == 0  # not due yet
        WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    deliver_due()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("failed", 3, 500)
    assert len(receiver.received) == 3


def test_a_redirect_is_not_followed(receiver):
    run = _run_with_webhook(receiver.url, ["failed"])
    receiver.answers = [302]
    runs.training_run_cancel(run.session_id)
    deliver_due()
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.last_error) == ("pending", "answered 302")
    assert len(receiver.received) == 1


def test_a_host_no_longer_allowed_is_not_called(receiver, settings):
    run = _run_with_webhook(receiver.url, ["failed"])
    runs.training_run_cancel(run.session_id)
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    deliver_due()
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
    deliver_due()

    assert receiver.events() == ["started"] + ["progress"] * 5 + ["completed"]
    done = json.loads(receiver.received[-1]["body"])["data"]
    assert done["status"] == "completed"
    assert done["image_urls"] == [f"/generations/{generation.pk}/0.png"]


def test_a_generation_that_fails_posts_failed(receiver, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", webhook_url=receiver.url))
    Generation.objects.filter(pk=generation.pk).update(status="running")
    lifecycle.generations_finish_with_error([generation.pk], "the worker was lost")
    deliver_due()
    assert receiver.events() == ["failed"]
    assert json.loads(receiver.received[0]["body"])["data"]["message"] == "the worker was lost"


def test_a_cancelled_generation_posts_failed_with_status_cancelled(receiver, generation_worker):
    generation = generation_request(GenerationRequest(prompt="x", webhook_url=receiver.url))
    lifecycle.generation_cancel(generation.pk)
    lifecycle.generation_cancel(generation.pk)  # already ended: no second event
    deliver_due()
    assert receiver.events() == ["failed"]
    data = json.loads(receiver.received[0]["body"])["data"]
    assert (data["status"], data["message"]) == ("cancelled", lifecycle.CANCELLED_BY_REQUEST)


def _delivery(url: str, event: str = "completed", **fields) -> WebhookDelivery:
    return WebhookDelivery.objects.create(
        event=event,
        url=url,
        payload={"event": event},
        next_attempt_at=fields.pop("next_attempt_at", timezone.now()),
        **fields,
    )


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fc00::1",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:127.0.0.1",
    ],
)
def test_private_loopback_link_local_and_reserved_addresses_are_refused(address):
    assert webhooks.address_problem(ipaddress.ip_address(address))


def test_public_addresses_pass_and_allow_private_lets_all_but_metadata(settings):
    for public in ("93.184.215.14", "2606:4700::1111"):
        assert webhooks.address_problem(ipaddress.ip_address(public)) is None
    settings.SDXL_WEBHOOK_ALLOW_PRIVATE = True
    for private in ("127.0.0.1", "10.1.2.3", "::1", "fc00::1"):
        assert webhooks.address_problem(ipaddress.ip_address(private)) is None
    for metadata in ("169.254.169.254", "fd00:ec2::254"):
        assert "metadata" in webhooks.address_problem(ipaddress.ip_address(metadata))


def test_an_address_refused_is_a_400_when_the_request_names_it(settings):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS, settings.SDXL_WEBHOOK_SECRET = ["127.0.0.1"], SECRET
    with pytest.raises(ServiceError, match="address 127.0.0.1 is private, loopback") as error:
        webhooks.webhook_target_check("http://127.0.0.1:8000/hook", None)
    assert error.value.status == 400
    settings.SDXL_WEBHOOK_ALLOW_PRIVATE = True
    assert webhooks.webhook_target_check("http://127.0.0.1:8000/hook", None)[0]


def _resolving(monkeypatch, name: str, *addresses: str) -> list[str]:
    """Has `name` resolve to each of `addresses` in turn (the last one from then on); the
    list of lookups of `name` made."""
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != name:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        address = addresses[min(len(lookups), len(addresses)) - 1]
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_a_name_that_resolves_to_loopback_is_not_called(receiver, settings, monkeypatch):
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    settings.SDXL_WEBHOOK_ALLOW_PRIVATE = False
    _resolving(monkeypatch, "hooks.example.com", "127.0.0.1")
    port = receiver.server.server_port
    delivery = _delivery(f"http://hooks.example.com:{port}/hook")

    deliver_due()

    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 1
    assert delivery.last_error.startswith(
        "not sent: webhook_url host hooks.example.com resolves to 127.0.0.1, which is private"
    )
    assert receiver.received == []


def test_the_connection_goes_to_the_address_checked(receiver, settings, monkeypatch):
    """The name answers another address once checked (DNS rebinding): the attempt still
    connects to the checked one, with the name in its Host header."""
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.com"]
    port = receiver.server.server_port
    elsewhere = Receiver("127.0.0.2", port)
    lookups = _resolving(monkeypatch, "hooks.example.com", "127.0.0.1", "127.0.0.2")
    delivery = _delivery(f"http://hooks.example.com:{port}/hook")
    try:
        deliver_due()
    finally:
        elsewhere.server.shutdown()

    assert WebhookDelivery.objects.get(pk=delivery.pk).status == "delivered"
    assert lookups == ["hooks.example.com"]
    assert [request["headers"]["Host"] for request in receiver.received] == [
        f"hooks.example.com:{port}"
    ]
    assert elsewhere.received == []


def test_an_attempt_ends_at_its_deadline_however_slowly_the_receiver_answers(receiver, settings):
    settings.SDXL_WEBHOOK_TIMEOUT = 1
    tarpit = Tarpit(pause=0.2)  # each byte well within any per-read timeout
    delivery = _delivery(tarpit.url)
    try:
        started = time.monotonic()
        deliver_due()
        took = time.monotonic() - started
    finally:
        tarpit.stop()

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert delivery.last_error == "no complete answer within 1 s (SDXL_WEBHOOK_TIMEOUT)"
    assert took < 3


def test_claims_skip_a_host_at_its_limit_and_expired_claims_queue_from_their_expiry(settings):
    settings.SDXL_WEBHOOK_PER_HOST = 2
    now = timezone.now()
    slow = [
        _delivery("http://slow.example.com/hook", next_attempt_at=now - timedelta(seconds=30))
        for _ in range(3)
    ]
    other = _delivery("http://other.example.com/hook", next_attempt_at=now - timedelta(seconds=20))

    assert webhooks.webhooks_claim_due(3) == [slow[0].pk, slow[1].pk, other.pk]
    assert webhooks.webhooks_claim_due(3) == []  # slow.example.com has 2 in flight

    # Their worker died: the claims expire, and are due behind what was due before.
    WebhookDelivery.objects.filter(pk__in=[slow[0].pk, slow[1].pk]).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    late = _delivery("http://late.example.com/hook", next_attempt_at=now - timedelta(seconds=10))
    assert webhooks.webhooks_claim_due(3) == [slow[2].pk, late.pk, slow[0].pk]
    sending = WebhookDelivery.objects.filter(status="sending").count()
    assert sending == 5 and WebhookDelivery.objects.count() == 5
