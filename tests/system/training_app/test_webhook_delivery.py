"""A real generation worker posts a generation's webhook events from its own thread."""

import json

import pytest

from tests.processes import wait_until
from tests.training_app.services.test_webhooks import SECRET, Receiver
from training_app.models import WebhookDelivery
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.e2e


def test_the_generation_worker_delivers_a_generations_events(service_processes, settings):
    receiver = Receiver()
    hooks = {"SDXL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "SDXL_WEBHOOK_SECRET": SECRET}
    settings.SDXL_WEBHOOK_ALLOWED_HOSTS, settings.SDXL_WEBHOOK_SECRET = ["127.0.0.1"], SECRET
    try:
        service_processes.worker("generation", **hooks)
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

        assert receiver.events() == ["started", "completed"]
        body = json.loads(receiver.received[-1]["body"])
        assert (body["id"], body["data"]["status"]) == (generation.pk, "completed")
        assert set(WebhookDelivery.objects.values_list("status", flat=True)) == {"delivered"}
    finally:
        receiver.server.shutdown()
