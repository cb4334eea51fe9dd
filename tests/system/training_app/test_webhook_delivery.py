"""A real generation worker posts a generation's webhook events from its own threads, and
a receiver that never finishes answering delays no one else's."""

import json

import pytest
from django.utils import timezone

from tests.processes import wait_until
from tests.training_app.services.test_webhooks import SECRET, Receiver, Tarpit
from training_app.models import WebhookDelivery
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.e2e
# The receivers listen on loopback addresses, refused unless allowed.
HOOKS = {"SDXL_WEBHOOK_SECRET": SECRET, "SDXL_WEBHOOK_ALLOW_PRIVATE": "true"}


def test_the_generation_worker_delivers_a_generations_events(service_processes, settings):
    receiver = Receiver()
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS, settings.SDXL_WEBHOOK_SECRET = ["127.0.0.1"], SECRET
    settings.SDXL_WEBHOOK_ALLOW_PRIVATE = True
    try:
        service_processes.worker("generation", SDXL_WEBHOOK_ALLOWED_HOSTS="127.0.0.1", **HOOKS)
        generation = generation_request(
            GenerationRequest(
                prompt="x",
                height=64,
                width=64,
                steps=5,
                webhook_url=receiver.url,
                webhook_events=("started", "completed"),
            )
        )

        wait_until(lambda: "completed" in receiver.events(), 120, "the completed webhook")

        wait_until(lambda: len(receiver.events()) == 2, 10, "the started webhook")
        # Sent by concurrent threads: in either order (the payload's created_at orders them).
        assert sorted(receiver.events()) == ["completed", "started"]
        bodies = [json.loads(request["body"]) for request in receiver.received]
        (body,) = [body for body in bodies if body["event"] == "completed"]
        assert (body["id"], body["data"]["status"]) == (generation.pk, "completed")
        # Recorded by the worker once the receiver's answer is in: a moment after it.
        wait_until(
            lambda: set(WebhookDelivery.objects.values_list("status", flat=True)) == {"delivered"},
            10,
            "both deliveries recorded as delivered",
        )
    finally:
        receiver.server.shutdown()


def _event(url: str, owner: str) -> WebhookDelivery:
    return WebhookDelivery.objects.create(
        event="completed", url=url, payload={"owner": owner}, next_attempt_at=timezone.now()
    )


def test_a_tarpit_receiver_delays_only_its_own_events_across_a_restart(service_processes):
    """A receiver that answers a byte a second and never finishes holds its deliveries
    (their deadline set past the test's end): another receiver's events, due after the
    tarpit's, are delivered within 10 s, with the worker restarted in between too."""
    tarpit, receiver = Tarpit(pause=1), Receiver("127.0.0.2")
    hooks = {
        **HOOKS,
        "SDXL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,127.0.0.2",
        "SDXL_WEBHOOK_TIMEOUT": "120",
    }
    try:
        for _ in range(6):
            _event(tarpit.url, "tarpit's owner")
        worker = service_processes.worker("generation", **hooks)
        wait_until(lambda: tarpit.held, 30, "the tarpit to hold a delivery")
        first = _event(receiver.url, "another owner")

        wait_until(lambda: len(receiver.received) == 1, 10, "the other owner's event")
        assert tarpit.held == 2  # SDXL_WEBHOOK_PER_HOST: its other 4 events wait their turn

        # Killed with the tarpit's claims in hand: the worker started next does not take
        # them back before the other owner's event.
        worker.kill()
        second = _event(receiver.url, "another owner")
        service_processes.worker("generation", **hooks)
        wait_until(lambda: len(receiver.received) == 2, 10, "the other owner's next event")

        delivered = [json.loads(request["body"]) for request in receiver.received]
        assert delivered == [{"owner": "another owner"}] * 2
        assert {first.pk, second.pk} == set(
            WebhookDelivery.objects.filter(status="delivered").values_list("pk", flat=True)
        )
        assert not WebhookDelivery.objects.filter(url=tarpit.url, status="delivered").exists()
    finally:
        tarpit.stop()
        receiver.server.shutdown()
