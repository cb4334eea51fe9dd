"""`manage.py worker training|generation`: one django-q2 cluster serving one queue
(training_app.workers.worker says how it beats, recovers and exits)."""

import os
import sys

from django.core.management.base import BaseCommand, CommandError, CommandParser

from training_app.workers.worker import QUEUES, cluster_name, run_worker


class Command(BaseCommand):
    help = "Runs the worker cluster of one queue: training or generation."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("queue", choices=QUEUES)

    def handle(self, *args: object, queue: str, **options: object) -> None:
        if os.environ.get("Q_CLUSTER_NAME") != cluster_name(queue):
            # django-q2 reads its cluster name from the environment when it is first
            # imported, which Django setup has already done: start again with it set.
            os.environ["Q_CLUSTER_NAME"] = cluster_name(queue)
            os.execv(sys.executable, [sys.executable, *sys.argv])
        fault = run_worker(queue, self.stdout.write)
        if fault is not None:
            raise CommandError(fault, returncode=1)
