"""`manage.py purge_sessions --older-than DAYS [--dry-run]`: delete idle sessions."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sessions_app.services import sessions_purge


class Command(BaseCommand):
    help = (
        "Deletes sessions (rows and folders) with nothing new (images, LoRAs, training runs) "
        "for DAYS days; a session that is training is kept. --dry-run only lists them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, required=True, metavar="DAYS")
        parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")

    def handle(self, *args: object, older_than: float, dry_run: bool, **options: object) -> None:
        if older_than < 0:
            raise CommandError("--older-than must be 0 or more days")
        sessions = sessions_purge(older_than, dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        for session in sessions:
            last = f"{session.last_activity:%Y-%m-%d %H:%M}"
            self.stdout.write(f"{verb} session {session.pk} (last activity {last})")
        self.stdout.write(f"{verb} {len(sessions)} sessions idle for {older_than:g} days")
