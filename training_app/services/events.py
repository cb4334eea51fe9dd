"""Event streams: the Server-Sent Events wire format of a run's or generation's recorded
events (training_app.models.Event), Last-Event-ID, and the reads a stream polls with.

Each event goes out as `id: <Event id>\\nevent: <name>\\ndata: <payload, one line of
JSON>\\n\\n`; a client resumes with `Last-Event-ID: <id>` (or ?last_event_id=) and gets only
the events after it. A stream ends after its subject's terminal event."""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from django.conf import settings

from access_app.callers import Caller
from core.errors import ServiceError
from sessions_app.selectors import sessions_visible
from training_app.models import Event, Generation, TrainingRun
from training_app.selectors import generation_get

Kind = Literal["run", "generation"]
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
HEARTBEAT = b": ping\n\n"
# A subject no longer active whose stream saw no terminal event (a generation abandoned
# before it ran records none) is ended after this many polls without news.
_POLLS_AFTER_END = 2
RecordedEvent = tuple[int, str, dict[str, Any]]


def sse_event(event_id: int, name: str, payload: dict[str, Any]) -> bytes:
    """One event as the stream sends it (JSON has no raw newline: `data` is one line)."""
    data = json.dumps(payload, separators=(",", ":"))
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


# Event ids are 64-bit (BigAutoField): a larger one would reach the database as an error
# (PostgreSQL: bigint out of range), not as "no event after it".
MAX_EVENT_ID = 2**63 - 1


def last_event_id(header: str | None, query: str | None) -> int:
    """The id after which a stream starts: the Last-Event-ID header, else ?last_event_id=,
    else 0 (every event). 400 for one that is no non-negative integer."""
    value = header if header not in (None, "") else query
    if value in (None, ""):
        return 0
    assert value is not None
    value = value.strip()
    if not value.isdigit() or not value.isascii() or int(value) > MAX_EVENT_ID:
        raise ServiceError(
            f"Last-Event-ID must be an event id (an integer from 0 to {MAX_EVENT_ID}), "
            f"not {value!r}"
        )
    return int(value)


def event_subject_check(kind: Kind, subject_id: int, caller: Caller | None) -> None:
    """404 for a run or generation that does not exist or is another owner's (as GET
    /generations/<id> and /train_status answer)."""
    if kind == "generation":
        generation_get(subject_id, caller)
    elif not TrainingRun.objects.filter(
        pk=subject_id, session__in=sessions_visible(caller)
    ).exists():
        raise ServiceError(f"training run {subject_id} not found", status=404)


@dataclass
class SubjectEvents:
    """A poll's answer for one subject: its events after the id asked, and whether it is
    still active (queued or running); `exists` False once it was deleted."""

    events: list[RecordedEvent]
    active: bool
    exists: bool


def events_after(
    watched: dict[tuple[Kind, int], int],
) -> dict[tuple[Kind, int], SubjectEvents]:
    """For each (kind, id) watched, its events with an id above the one given, oldest
    first, and its state: two queries per kind, however many streams watch."""
    found: dict[tuple[Kind, int], SubjectEvents] = {}
    kinds: tuple[tuple[Kind, type[TrainingRun] | type[Generation], str], ...] = (
        ("run", TrainingRun, "run_id"),
        ("generation", Generation, "generation_id"),
    )
    for kind, model, column in kinds:
        ids = {subject_id: after for (k, subject_id), after in watched.items() if k == kind}
        if not ids:
            continue
        statuses = dict(model.objects.filter(pk__in=ids).values_list("pk", "status"))
        for subject_id in ids:
            status = statuses.get(subject_id)
            found[(kind, subject_id)] = SubjectEvents(
                [], status in model.ACTIVE_STATUSES, status is not None
            )
        rows = Event.objects.filter(
            **{f"{column}__in": list(ids)}, id__gt=min(ids.values())
        ).values_list(column, "id", "name", "payload")
        for subject_id, event_id, name, payload in rows.order_by("id"):
            if event_id > ids[subject_id]:
                found[kind, subject_id].events.append((event_id, name, payload))
    return found


@dataclass
class StreamCursor:
    """Where one stream is: the last event id it sent, and whether it has ended (after a
    terminal event, its subject deleted, or ended without one for _POLLS_AFTER_END polls)."""

    after: int
    ended: bool = False
    _quiet_polls_ended: int = 0

    def take(self, state: SubjectEvents) -> list[RecordedEvent]:
        """The events of a poll's answer this stream sends next, up to a terminal one."""
        news: list[RecordedEvent] = []
        for event in state.events:
            if event[0] > self.after:
                news.append(event)
                self.after = event[0]
                if event[1] in TERMINAL_EVENTS:
                    self.ended = True
                    break
        if news:
            self._quiet_polls_ended = 0
        elif not state.exists:
            self.ended = True
        elif not state.active:
            self._quiet_polls_ended += 1
            self.ended = self._quiet_polls_ended >= _POLLS_AFTER_END
        return news


def event_blocks(kind: Kind, subject_id: int, after: int) -> Iterator[bytes]:
    """A stream as a blocking iterator, for Django's own servers (runserver, the test
    client): it polls on its thread. `serve` streams on its event loop instead
    (sdxl_service.event_streams), with no thread per stream."""
    cursor = StreamCursor(after)
    last_sent = time.monotonic()
    while True:
        for event in cursor.take(
            events_after({(kind, subject_id): cursor.after})[kind, subject_id]
        ):
            last_sent = time.monotonic()
            yield sse_event(*event)
        if cursor.ended:
            return
        if time.monotonic() - last_sent >= settings.SDXL_EVENTS_HEARTBEAT_S:
            last_sent = time.monotonic()
            yield HEARTBEAT
        time.sleep(settings.SDXL_EVENTS_POLL_S)
