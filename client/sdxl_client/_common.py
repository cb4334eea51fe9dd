"""What the sync and async clients share: settings, request bodies, answers read, and
the events made up from polling when a server has no event streams."""

import base64
import os
from pathlib import Path
from typing import Any

import httpx

from .errors import SDXLError
from .models import GENERATION_FIELDS, TRAINING_FIELDS, Event, LoraRef, check_fields

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_INTERVAL_S = 1.0
# Reconnections in a row that bring nothing (no event, no heart-beat) before the stream
# is given up.
MAX_RECONNECTS = 5
# An event stream sends a heart-beat every 15 s: this long without a byte, the connection
# is taken for dead and reopened with Last-Event-ID.
STREAM_SILENCE_S = 45.0


def stream_timeout(timeout: httpx.Timeout) -> httpx.Timeout:
    return httpx.Timeout(timeout.connect, read=max(timeout.read or 0, STREAM_SILENCE_S))


def base_url(url: str | None) -> str:
    return (url or os.environ.get("SDXL_URL") or DEFAULT_URL).rstrip("/")


def auth_headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get("SDXL_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; SDXLError otherwise."""
    if response.status_code >= 400:
        raise SDXLError.from_response(response)
    if not response.content:
        return {}
    return response.json()


def training_body(session_id: int | str, fields: dict[str, Any]) -> dict[str, Any]:
    check_fields(fields, TRAINING_FIELDS, "/train_lora")
    return {**fields, "session_id": session_id}


def generation_body(
    prompt: str,
    loras: list[LoraRef | dict[str, Any]] | None,
    session_id: int | str | None,
    use_lora: bool | None,
    init_image: bytes | str | Path | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    check_fields(fields, GENERATION_FIELDS, "/txt2img")
    body: dict[str, Any] = {**fields, "prompt": prompt, "async": True}
    if loras is not None:
        body["loras"] = [lora.as_api() if isinstance(lora, LoraRef) else lora for lora in loras]
    if session_id is not None:
        body["session_id"] = session_id
    if use_lora is not None:
        body["use_lora"] = use_lora
    if init_image is not None:
        content = init_image if isinstance(init_image, bytes) else Path(init_image).read_bytes()
        body["init_image_base64"] = base64.b64encode(content).decode()
    return body


def events_url(kind: str, object_id: int) -> str:
    return f"/{kind}/{object_id}/events"


class RunPoller:
    """Events made up from successive /train_status answers: `progress` when the step
    moves, `sample` and `checkpoint` for new ones, and the terminal event, each with the
    webhook's body (data: the status with run_id and session_id)."""

    def __init__(self, run_id: int, session_id: int | str) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.next_id = 1
        self.step: int | None = None
        self.samples = 0
        self.checkpoints = 0
        self.started = False

    def _event(self, name: str, status: dict[str, Any], **extra: Any) -> Event:
        data = {**status, **extra, "run_id": self.run_id, "session_id": str(self.session_id)}
        body = {"event": name, "type": "training", "id": self.run_id, "created_at": None}
        event = Event(self.next_id, name, {**body, "data": data})
        self.next_id += 1
        return event

    def events(self, status: dict[str, Any]) -> list[Event]:
        found = []
        state = status.get("status")
        if not self.started and (state != "in-progress" or not status.get("queued")):
            self.started = True
            found.append(self._event("started", status))
        samples = status.get("samples") or []
        for sample in samples[self.samples :]:
            found.append(self._event("sample", status, step=sample.get("step")))
        self.samples = max(self.samples, len(samples))
        checkpoints = status.get("checkpoints") or []
        for checkpoint in checkpoints[self.checkpoints :]:
            found.append(self._event("checkpoint", status, step=checkpoint.get("step")))
        self.checkpoints = max(self.checkpoints, len(checkpoints))
        queued = state == "in-progress" and status.get("queued")
        if state == "in-progress" and not queued and status.get("step") != self.step:
            self.step = status.get("step")
            found.append(self._event("progress", status))
        if state == "completed":
            found.append(self._event("completed", status))
        elif state in ("error", "cancelled"):
            found.append(self._event("failed", status))
        return found


class GenerationPoller:
    """Events made up from successive GET /generations/<id> answers."""

    def __init__(self, generation_id: int) -> None:
        self.generation_id = generation_id
        self.next_id = 1
        self.state: str | None = None
        self.step: int | None = None

    def _event(self, name: str, status: dict[str, Any]) -> Event:
        body = {"event": name, "type": "generation", "id": self.generation_id}
        event = Event(self.next_id, name, {**body, "created_at": None, "data": status})
        self.next_id += 1
        return event

    def events(self, status: dict[str, Any]) -> list[Event]:
        found = []
        state = status.get("status")
        if (
            state != self.state
            and state in ("running", "completed")
            and self.state in (None, "queued")
        ):
            found.append(self._event("started", status))
        if state == "running" and status.get("step") != self.step:
            self.step = status.get("step")
            found.append(self._event("progress", status))
        if state == "completed":
            found.append(self._event("completed", status))
        elif state in ("error", "abandoned", "cancelled"):
            found.append(self._event("failed", status))
        self.state = state
        return found


def is_terminal(event: Event) -> bool:
    return event.name in ("completed", "failed", "cancelled")


def filename_from(response: httpx.Response, fallback: str) -> str:
    disposition = response.headers.get("Content-Disposition", "")
    for item in disposition.split(";"):
        key, _, value = item.strip().partition("=")
        if key == "filename" and value:
            return Path(value.strip('"')).name
    return fallback
