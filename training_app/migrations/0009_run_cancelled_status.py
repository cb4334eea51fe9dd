"""A cancelled training run ends `cancelled`, as a generation does, not `error`: the new
choice, and the runs cancelled before it (status error, message "training was cancelled")
move to it. Backwards, they go back to error with that message."""

from django.db import migrations, models

CANCELLED_MESSAGE = "training was cancelled"  # training_app.services.runs.CANCELLED_MESSAGE


def cancelled_runs_say_so(apps, schema_editor):
    TrainingRun = apps.get_model("training_app", "TrainingRun")
    TrainingRun.objects.filter(status="error", error_message=CANCELLED_MESSAGE).update(
        status="cancelled"
    )


def cancelled_runs_were_errors(apps, schema_editor):
    TrainingRun = apps.get_model("training_app", "TrainingRun")
    TrainingRun.objects.filter(status="cancelled").update(
        status="error", error_message=CANCELLED_MESSAGE
    )


class Migration(migrations.Migration):
    dependencies = [
        ("training_app", "0008_generation_owner"),
    ]

    operations = [
        migrations.AlterField(
            model_name="trainingrun",
            name="status",
            field=models.CharField(
                choices=[
                    ("queued", "Queued"),
                    ("running", "Running"),
                    ("completed", "Completed"),
                    ("error", "Error"),
                    ("cancelled", "Cancelled"),
                ],
                default="queued",
                max_length=16,
            ),
        ),
        migrations.RunPython(cancelled_runs_say_so, cancelled_runs_were_errors),
    ]
