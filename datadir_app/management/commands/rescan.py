"""`manage.py rescan [--session N]`: rows follow files added or removed by hand."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.console import print_report, progress
from core.errors import ServiceError
from datadir_app.rescan import rescan


class Command(BaseCommand):
    help = (
        "Brings the database in line with files dropped into or removed from session "
        "folders by hand: new groups, images, captions and LoRA files get rows, rows of "
        "files that are gone are removed, changed files update their rows. Files are never "
        "changed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--session", type=int, help="only this session (default: all)")

    def handle(self, *args: object, session: int | None, **options: object) -> None:
        try:
            report = rescan(session, progress("rescanning"))
        except ServiceError as error:
            raise CommandError(error.message) from None
        print_report(self, report)
        self.stdout.write(f"rescan: {len(report.fixed)} changes")
        if report.problems:
            raise CommandError(f"{len(report.problems)} files need a person (above)")
