"""Event streams: the Server-Sent Events wire format of a run's or generation's recorded
events (training_app.models.Event), Last-Event-ID, and the reads a stream polls with.

Each event goes out as `id: <Event id>\\nevent: <name>\\ndata: <payload, one line of
JSON>\\n\\n`; a client resumes with `Last-Event-ID: <id>` (or ?last_event_id=) and gets only
the events after it. A stream ends after its subject's terminal event."""

import json
from dataclasses import dataclass
from typing import Any, Literal

from access_app.callers import Caller
from core.errors import ServiceError
from sessions_app.selectors import sessions_visible
from training_app.models import Event, Generation, TrainingRun
from training_app.selectors import generation_get

Kind = Literal["run", "generation"]
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
HEARTBEAT = b": ping\n\n"


def sse_event(event_id: int, name: str, payload: dict[str, Any]) -> bytes:
    """One event as the stream sends it (JSON has no raw newline: `data` is one line)."""
    data = json.dumps(payload, separators=(",", ":"))
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


def last_event_id(header: str | None, query: str | None) -> int:
    """The id after which a stream starts: the Last-Event-ID header, else ?last_event_id=,
    else 0 (every event). 400 for one that is no non-negative integer."""
    value = header if header not in (None, "") else query
    if value in (None, ""):
        return 0
    assert value is not None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise ServiceError(f"Last-Event-ID must be an event id (an integer), not {value!r}")
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

    events: list[tuple[int, str, dict[str, Any]]]
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
