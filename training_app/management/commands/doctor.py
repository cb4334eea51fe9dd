"""`manage.py doctor`: what a person needs to know before the first request."""

from django.core.management.base import BaseCommand, CommandError

from training_app.workers.doctor import FAIL, OK, WARN, run_checks


class Command(BaseCommand):
    help = (
        "Checks GPU and VRAM, which models will load from where and whether their weights "
        "are present (nothing is downloaded), database and broker reachability, live "
        "workers and free disk. Exits 1 if any check fails. Initialises CUDA in this "
        "process only."
    )

    # Django's own checks would stop at an unreachable database; reporting it is our job.
    requires_system_checks = []

    def handle(self, *args: object, **options: object) -> None:
        checks = run_checks()
        style = {OK: self.style.SUCCESS, WARN: self.style.WARNING, FAIL: self.style.ERROR}
        for check in checks:
            self.stdout.write(
                f"{style[check.status](f'[{check.status:>4}]')} {check.name}: {check.detail}"
            )
        failed = [check.name for check in checks if check.status == FAIL]
        if failed:
            raise CommandError(f"doctor: {len(failed)} checks failed: {', '.join(failed)}")
        warned = sum(check.status == WARN for check in checks)
        self.stdout.write(f"doctor: {len(checks)} checks, {warned} warnings, none failed")
