"""Event log and stream format: every run and generation records its events (webhook or
not), a cancel as "cancelled", progress each hundredth; the SSE wire format, Last-Event-ID,
and the poll that reads a stream's news."""

import pytest

from core.errors import ServiceError
from tests.training_app.services import test_webhooks
from training_app.models import Event, WebhookDelivery
from training_app.services import events, runs
from training_app.services.generations import batches, lifecycle
from training_app.services.generations.requests import GenerationRequest, generation_request

pytestmark = pytest.mark.django_db
receiver = test_webhooks.receiver  # the webhook receiver fixture


@pytest.mark.one_pass
def test_an_event_is_one_sse_block_with_its_data_on_one_line():
    block = events.sse_event(7, "progress", {"event": "progress", "data": {"note": "a\nb"}})
    assert block == (
        b'id: 7\nevent: progress\ndata: {"event":"progress","data":{"note":"a\\nb"}}\n\n'
    )


@pytest.mark.one_pass
@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [
        (None, None, 0),
        ("", None, 0),
        ("12", None, 12),
        (None, "5", 5),
        ("3", "9", 3),
        (str(2**63 - 1), None, 2**63 - 1),
        (" 4 ", None, 4),
    ],
)
def test_last_event_id_from_the_header_else_the_query(header, query, expected):
    assert events.last_event_id(header, query) == expected


@pytest.mark.one_pass
@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "٣", str(2**63)])
def test_a_last_event_id_that_is_no_id_is_a_400(value):
    with pytest.raises(ServiceError) as raised:
        events.last_event_id(value, None)
    assert raised.value.status == 400


def test_a_run_without_a_webhook_records_every_event_in_order(session_with_images):
    run = runs.training_run_start(
        session_with_images.pk,
        {"steps": 2, "resolution": 64, "sample_every": 1, "checkpoint_every": 1},
    )
    runs.training_run_execute(run.pk)

    names = list(Event.objects.filter(run=run).values_list("name", flat=True))
    assert names[0] == "started" and names[-1] == "completed"
    assert names.count("progress") == 2 and {"sample", "checkpoint"} <= set(names)
    assert not WebhookDelivery.objects.exists()
    last = Event.objects.filter(run=run).last()
    assert last is not None
    assert (last.payload["event"], last.payload["type"], last.payload["id"]) == (
        "completed",
        "training",
        run.pk,
    )
    assert last.payload["data"]["status"] == "completed"


def test_a_streams_payload_is_the_webhooks_and_a_cancel_is_cancelled(receiver, session_with_images):
    session_id = session_with_images.pk
    run = runs.training_run_start(
        session_id, {"steps": 2}, webhook_url=receiver.url, webhook_events=["failed"]
    )
    runs.training_run_cancel(session_id)

    delivery = WebhookDelivery.objects.get()
    (event,) = Event.objects.filter(run=run)
    assert (delivery.event, event.name) == ("failed", "cancelled")
    assert event.payload == {**delivery.payload, "event": "cancelled"}
    assert event.payload["data"]["status"] == "cancelled"


def test_a_generation_streams_progress_each_hundredth_webhooks_each_tenth(
    receiver, generation_worker, monkeypatch
):
    # Each step written (on a fast GPU: at most every 0.25 s, and each tenth).
    monkeypatch.setattr(batches, "_PROGRESS_INTERVAL_S", 0)
    generation = generation_request(
        GenerationRequest(
            prompt="x",
            height=64,
            width=64,
            steps=20,
            webhook_url=receiver.url,
            webhook_events=("progress",),
        )
    )
    batches.generation_execute(generation.pk)

    names = list(Event.objects.filter(generation=generation).values_list("name", flat=True))
    assert names == ["started"] + ["progress"] * 20 + ["completed"]
    assert WebhookDelivery.objects.filter(event="progress").count() == 10


def test_the_poll_reads_each_subjects_news_and_state(generation_worker):
    first = generation_request(GenerationRequest(prompt="x"))
    second = generation_request(GenerationRequest(prompt="y"))
    lifecycle.generation_cancel(first.pk)
    (cancelled,) = Event.objects.filter(generation=first)

    found = events.events_after({("generation", first.pk): 0, ("generation", second.pk): 0})
    assert found[("generation", first.pk)] == events.SubjectEvents(
        [(cancelled.pk, "cancelled", cancelled.payload)], active=False, exists=True
    )
    assert found[("generation", second.pk)] == events.SubjectEvents([], True, True)
    after = events.events_after({("generation", first.pk): cancelled.pk})
    assert after[("generation", first.pk)].events == []

    first.delete()  # its events go with it
    assert not Event.objects.filter(pk=cancelled.pk).exists()
    gone = events.events_after({("generation", first.pk): 0, ("run", second.pk + 10**6): 0})
    assert not gone[("generation", first.pk)].exists and not gone[("run", second.pk + 10**6)].exists


def test_another_owners_subject_is_a_404(session_with_images):
    from access_app.callers import Caller
    from access_app.models import Owner

    stranger = Owner.objects.create(name="stranger")
    caller = Caller("stranger", stranger.pk, frozenset({"read"}))
    run = runs.training_run_start(session_with_images.pk, {"steps": 2})
    events.event_subject_check("run", run.pk, None)
    for kind, subject_id in (("run", run.pk), ("generation", 10**6)):
        with pytest.raises(ServiceError) as raised:
            events.event_subject_check(kind, subject_id, caller)
        assert raised.value.status == 404
