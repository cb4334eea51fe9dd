"""`manage.py verify [--fix]`: every row against its file, every file against a row."""

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.console import print_report, progress
from datadir_app.verify import verify
from sessions_app.models import Session, TrainingImage
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingSample


class Command(BaseCommand):
    help = (
        "Checks every row against its file (exists, size, sha256, images and masks decode, "
        "LoRA and checkpoint headers readable, sample images present) and every file against "
        "a row; "
        "prints a report and exits 1 on any mismatch. --fix repairs what can be repaired "
        "without losing data (rows follow the files; stale leftovers of interrupted writes "
        "and the resume state of runs that have ended go) and reports what is left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--fix", action="store_true", help="repair what loses no data")

    def handle(self, *args: object, fix: bool, **options: object) -> None:
        report = verify(fix=fix, progress=progress("verifying"))
        print_report(self, report)
        self.stdout.write(
            f"verify: {Session.objects.count()} sessions, {TrainingImage.objects.count()} "
            f"images, {TrainingImage.objects.exclude(mask_file='').count()} masks, "
            f"{LoraArtifact.objects.count()} LoRA files, "
            f"{TrainingCheckpoint.objects.count()} checkpoints, "
            f"{TrainingSample.objects.count()} sample images checked; "
            f"{len(report.fixed)} fixed, {len(report.changes)} mismatches, "
            f"{len(report.problems)} problems"
        )
        if not report.clean:
            hint = "" if fix else "; `verify --fix` repairs the mismatches"
            raise CommandError(
                f"{len(report.changes) + len(report.problems)} inconsistencies{hint}"
            )
        self.stdout.write(self.style.SUCCESS("verify: the rows and files agree"))
