"""`manage.py import_sessions <folder> [--copy]`: adopt the original service's session data."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.console import print_report, progress
from core.errors import ServiceError
from datadir_app.legacy_import import import_sessions


class Command(BaseCommand):
    help = (
        "Adopts a session_data/ folder written by the original Flask service (or a data dir "
        "holding one): sessions keep their ids; groups, images, captions and LoRA files "
        "become rows. Without --copy the folder must be this service's own session data "
        "(set SDXL_DATA_DIR to its parent); with --copy its files are copied in. Running it "
        "again changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("folder", type=Path, help="the session_data/ folder to adopt")
        parser.add_argument(
            "--copy",
            action="store_true",
            help="copy the files into the data dir (an existing different file is never "
            "overwritten)",
        )

        parser.add_argument(
            "--owner",
            help="the owner adopted sessions belong to, created if new (default: default); "
            "sessions adopted before keep theirs",
        )

    def handle(
        self, *args: object, folder: Path, copy: bool, owner: str | None, **options: object
    ) -> None:
        try:
            result = import_sessions(folder, copy, progress("importing"), owner)
        except ServiceError as error:
            raise CommandError(error.message) from None
        print_report(self, result.report)
        self.stdout.write(
            f"imported {len(result.sessions)} sessions "
            f"({', '.join(map(str, result.sessions))}): {len(result.report.fixed)} changes, "
            f"{result.copied} files copied"
        )
        if result.report.problems:
            raise CommandError(f"{len(result.report.problems)} files need a person (above)")
