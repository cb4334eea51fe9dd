"""`manage.py export_session N <file.zip>`: one session, images to LoRAs and runs, as a zip."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.errors import ServiceError
from datadir_app.archive import session_export


class Command(BaseCommand):
    help = (
        "Writes session N (images, captions, masks, LoRA files, training runs with their "
        "parameters, history, checkpoints and sample images, and what their rows say) to a "
        "zip file that import_session reads back."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("session_id", type=int)
        parser.add_argument("file", type=Path, help="the zip file to write")

    def handle(self, *args: object, session_id: int, file: Path, **options: object) -> None:
        try:
            manifest = session_export(session_id, file)
        except ServiceError as error:
            raise CommandError(error.message) from None
        images = [image for group in manifest["groups"] for image in group["images"]]
        masks = sum(1 for image in images if "mask" in image)
        runs = manifest["runs"]
        checkpoints = sum(len(run["checkpoints"]) for run in runs)
        samples = sum(len(run["samples"]) for run in runs)
        self.stdout.write(
            f"exported session {session_id} to {file}: {len(manifest['groups'])} groups, "
            f"{len(images)} images, {masks} masks, {len(manifest['loras'])} LoRA files, "
            f"{len(runs)} training runs, {checkpoints} checkpoints, {samples} sample images"
        )
