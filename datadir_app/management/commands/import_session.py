"""`manage.py import_session <file.zip>`: a session exported by export_session, as a new one."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import ServiceError
from datadir_app.archive import session_import


class Command(BaseCommand):
    help = (
        "Creates a new session (new id) from a zip written by export_session: the same "
        "groups, images, captions, LoRA files and numbers, and the training runs (new ids) "
        "with their parameters, history, checkpoints and sample images. Archives of every "
        "earlier version are read. Unsafe archive paths are refused before anything is "
        "written; a failure leaves nothing behind."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="the zip file to read")
        parser.add_argument(
            "--owner", help="the owner the session belongs to, created if new (default: default)"
        )

    def handle(self, *args: object, file: Path, owner: str | None, **options: object) -> None:
        try:
            session = session_import(file, owner)
        except ServiceError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"imported {file} as session {session.pk}")
