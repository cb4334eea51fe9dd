"""`manage.py recover_runs`: end training runs whose worker died, now.

Workers do this by themselves (at start and every few seconds); this is for an operator
who stopped them all.
"""

from django.core.management.base import BaseCommand

from training_app.services.runs import training_runs_recover_lost


class Command(BaseCommand):
    help = (
        "Marks running training runs whose heartbeat is older than SDXL_RUN_STALE_AFTER as "
        "lost (error) and removes their temporary files."
    )

    def handle(self, *args, **options):
        recovered = training_runs_recover_lost()
        if recovered:
            self.stdout.write(
                f"{len(recovered)} training run(s) lost their worker, now marked as error: "
                + ", ".join(str(run_id) for run_id in recovered)
            )
        else:
            self.stdout.write("no training run has lost its worker")
