"""Sizes for the stored-MB quota: each sample image's bytes, each completed generation's
folder's. Rows already there are measured from their files (missing ones count 0)."""

from django.conf import settings
from django.db import migrations, models


def measure_existing_files(apps, schema_editor):
    TrainingSample = apps.get_model("training_app", "TrainingSample")
    Generation = apps.get_model("training_app", "Generation")
    for sample in TrainingSample.objects.select_related("run").iterator():
        path = (
            settings.SESSION_DATA_DIR
            / f"session_{sample.run.session_id}"
            / "samples"
            / f"run_{sample.run_id}"
            / sample.filename
        )
        if path.is_file():
            TrainingSample.objects.filter(pk=sample.pk).update(size=path.stat().st_size)
    for generation in Generation.objects.filter(status="completed").iterator():
        folder = settings.GENERATIONS_DIR / str(generation.pk)
        if folder.is_dir():
            size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
            Generation.objects.filter(pk=generation.pk).update(stored_bytes=size)


class Migration(migrations.Migration):
    dependencies = [
        ("training_app", "0011_checkpoint_scores_and_loss_history"),
    ]

    operations = [
        migrations.AddField(
            model_name="trainingsample",
            name="size",
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="generation",
            name="stored_bytes",
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.RunPython(measure_existing_files, migrations.RunPython.noop),
    ]
