"""Server-Sent Events: the parser of `text/event-stream` lines (WHATWG's rules)."""

import json
from collections.abc import Iterable, Iterator
from typing import Any

from .models import Event


class EventParser:
    """Fed lines, yields an Event at each blank line that ends one with data. Comments
    (`: ping`) are heart-beats and yield nothing."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._id: str | None = None
        self._name = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._reset()
            return None
        text = "\n".join(self._data)
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = {"text": text}
        event = Event(
            id=int(self._id) if self._id and self._id.isdigit() else 0,
            name=self._name,
            data=data if isinstance(data, dict) else {"value": data},
        )
        self._reset()
        return event


def parse_lines(lines: Iterable[str]) -> Iterator[Event]:
    parser = EventParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
