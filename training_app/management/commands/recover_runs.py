"""`manage.py recover_runs`: queue again (to resume) or end training runs whose worker died,
now.

Workers do this by themselves (at start and every few seconds); this is for an operator
who stopped them all.
"""

from django.core.management.base import BaseCommand

from training_app import jobs
from training_app.services.runs import TRAINING_RUNS


class Command(BaseCommand):
    help = (
        "Queues running training runs whose heartbeat is older than SDXL_RUN_STALE_AFTER "
        "again, to resume from their last checkpoint (past SDXL_TRAINING_MAX_RESUMES: ends "
        "them as errors), and removes their temporary files."
    )

    def handle(self, *args: object, **options: object) -> None:
        recovered = jobs.end_lost(TRAINING_RUNS)
        if recovered:
            self.stdout.write(
                f"{len(recovered)} training run(s) lost their worker, queued again to resume "
                "(or ended, past SDXL_TRAINING_MAX_RESUMES): "
                + ", ".join(str(run_id) for run_id in recovered)
            )
        else:
            self.stdout.write("no training run has lost its worker")
