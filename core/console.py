"""What the maintenance commands share: progress bars and printing a maintenance report."""

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

from django.core.management.base import BaseCommand
from tqdm import tqdm

Item = TypeVar("Item")


def progress(description: str, unit: str = "session") -> Callable[[Iterable[Item]], Iterable[Item]]:
    """A tqdm bar on stderr around an iterable; silent when stderr is not a terminal."""
    return lambda items: tqdm(items, desc=description, unit=unit, disable=None)


class _Described(Protocol):
    @property
    def text(self) -> str: ...


class MaintenanceReport(Protocol):
    """What print_report reads of a datadir_app.report.Report (a layer above this one)."""

    @property
    def fixed(self) -> Sequence[_Described]: ...
    @property
    def changes(self) -> Sequence[_Described]: ...
    @property
    def problems(self) -> Sequence[str]: ...
    @property
    def notes(self) -> Sequence[str]: ...


def print_report(command: BaseCommand, report: MaintenanceReport) -> None:
    """Prints a datadir_app.report.Report: what was fixed, what is wrong, notes."""
    for change in report.fixed:
        command.stdout.write(f"fixed     {change.text}")
    for change in report.changes:
        command.stdout.write(command.style.WARNING(f"mismatch  {change.text}"))
    for problem in report.problems:
        command.stdout.write(command.style.ERROR(f"problem   {problem}"))
    for note in report.notes:
        command.stdout.write(f"note      {note}")
