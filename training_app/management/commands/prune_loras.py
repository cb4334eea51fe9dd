"""`manage.py prune_loras --keep N [--dry-run]`: keep each session's newest N LoRA files and
its newest N checkpoints of runs that have ended."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import ServiceError
from training_app.services.loras import loras_prune


class Command(BaseCommand):
    help = (
        "Deletes all but the newest N LoRA files (and rows) of every session, and all but "
        "its newest N checkpoints of runs that have ended (the latest run's last steps "
        "first). Numbers are never reused: the next LoRA still gets the next number. "
        "Checkpoints of a queued or running run stay (it may resume from them), and so do "
        "sample images. A LoRA or checkpoint a queued or running generation is about to use "
        "is kept. --dry-run only lists them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keep", type=int, required=True, metavar="N")
        parser.add_argument("--session", type=int, help="only this session (default: all)")
        parser.add_argument("--dry-run", action="store_true", help="list, delete nothing")

    def handle(
        self, *args: object, keep: int, session: int | None, dry_run: bool, **options: object
    ) -> None:
        if keep < 0:
            raise CommandError("--keep must be 0 or more")
        try:
            pruned = loras_prune(keep, dry_run=dry_run, session_id=session)
        except ServiceError as error:
            raise CommandError(error.message) from None
        verb = "would delete" if dry_run else "deleted"
        for name in pruned:
            self.stdout.write(f"{verb} {name}")
        self.stdout.write(
            f"{verb} {len(pruned)} LoRA files, keeping the newest {keep} per session "
            f"(and the newest {keep} checkpoints)"
        )
