"""What a walk over the data dir finds: each difference between rows and files with its
repair, what needs a person, and notes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

Item = TypeVar("Item")


class Progress(Protocol):
    """Hands the items on while it shows how far they have got (core.console.progress)."""

    def __call__(self, items: Iterable[Item], /) -> Iterable[Item]: ...


def no_progress(items: Iterable[Item]) -> Iterable[Item]:
    return items


@dataclass(frozen=True)
class Change:
    """One way the rows differ from the files; `apply` makes them agree."""

    session_id: int | None
    text: str
    apply: Callable[[], object] = field(repr=False, compare=False)  # what it returns is unused


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)  # repairable without losing data
    problems: list[str] = field(default_factory=list)  # need a person
    notes: list[str] = field(default_factory=list)  # worth knowing, not a mismatch
    fixed: list[Change] = field(default_factory=list)  # changes already applied

    def extend(self, other: Report) -> None:
        self.changes += other.changes
        self.problems += other.problems
        self.notes += other.notes
        self.fixed += other.fixed

    def apply(self) -> None:
        """Applies every pending change; they move to `fixed`."""
        for change in self.changes:
            change.apply()
        self.fixed += self.changes
        self.changes = []

    @property
    def clean(self) -> bool:
        return not self.changes and not self.problems
