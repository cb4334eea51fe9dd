"""`manage.py reassign_owner FROM TO [--session ID ...] [--dry-run]`: give sessions (and
their generations) to another owner."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import ServiceError
from sessions_app.services import sessions_reassign


class Command(BaseCommand):
    help = (
        "Gives every session of owner FROM (or those named by --session) to owner TO "
        "(created if new), with their images, runs, LoRA files, checkpoints and samples; "
        "every generation of FROM moves too (with --session: those that applied the moved "
        "sessions' LoRAs). TO's tokens then see them; FROM's no longer do. Sessions made "
        "before API tokens belong to 'default': `reassign_owner default NAME` gives them to "
        "the owner of your first token. --dry-run only lists what would move."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("from_owner", metavar="FROM", help="the owner whose sessions move")
        parser.add_argument("to_owner", metavar="TO", help="the owner they go to")
        parser.add_argument(
            "--session",
            type=int,
            action="append",
            dest="session_ids",
            metavar="ID",
            help="only this session (repeat for more); default: all of FROM's",
        )
        parser.add_argument("--dry-run", action="store_true", help="list, move nothing")

    def handle(
        self,
        *args: object,
        from_owner: str,
        to_owner: str,
        session_ids: list[int] | None,
        dry_run: bool,
        **options: object,
    ) -> None:
        try:
            moved = sessions_reassign(from_owner, to_owner, session_ids, dry_run=dry_run)
        except ServiceError as error:
            raise CommandError(error.message) from None
        verb = "would move" if dry_run else "moved"
        sessions = moved["sessions"]
        listed = f": {', '.join(map(str, sessions))}" if sessions else ""
        self.stdout.write(
            f"{verb} {len(sessions)} sessions{listed} and {moved['generations']} generations "
            f"from owner {from_owner.strip()!r} to {to_owner.strip()!r}"
        )
