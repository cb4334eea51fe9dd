"""`manage.py serve`: migrations, then the web server and both worker clusters together,
supervised (training_app.workers.supervisor says how they are restarted and stopped).

Without an API token configured, the API is open to whoever reaches it, so it is served
on a loopback address only, unless the operator passes --insecure.
"""

import ipaddress

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from access_app.selectors import api_tokens_configured
from training_app.workers.supervisor import (
    STOP_GRACE_S,
    WEB_THREADS,
    WEB_WORKERS,
    ServeRefused,
    data_dir_lock,
    port_free_check,
    service_processes,
    supervise,
)


class Command(BaseCommand):
    help = "Migrates the database, then runs the web server and the worker clusters."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--web-workers",
            type=int,
            default=WEB_WORKERS,
            help="web server processes (gunicorn's uvicorn workers)",
        )
        parser.add_argument(
            "--threads",
            type=int,
            default=WEB_THREADS,
            help="requests each web process handles at once, each on a thread with its own "
            "database connection (a synchronous /txt2img holds one while it waits); clients "
            "still sending their request, or idle, hold none",
        )
        parser.add_argument(
            "--stop-grace",
            type=float,
            default=STOP_GRACE_S,
            help="seconds the processes get to stop on Ctrl-C/SIGTERM before they are killed",
        )
        parser.add_argument(
            "--gpus",
            default=",".join(settings.SDXL_GPUS),
            help="GPU indices, e.g. 0,1: one training and one generation worker per GPU, "
            "pinned with CUDA_VISIBLE_DEVICES (default: one of each, on whatever is visible)",
        )
        parser.add_argument(
            "--allow-shared-data-dir",
            action="store_true",
            help="start even though another serve uses the same data dir (SDXL_DATA_DIR); "
            "by default one serve per data dir",
        )
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="serve a non-loopback --host even though no API token is configured",
        )

    def handle(
        self,
        *args: object,
        host: str,
        port: int,
        web_workers: int,
        threads: int,
        gpus: str,
        insecure: bool,
        stop_grace: float = STOP_GRACE_S,
        allow_shared_data_dir: bool = False,
        **options: object,
    ) -> None:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        # Before anything starts: a second serve stops here, with no worker started.
        try:
            port_free_check(host, port)
            with data_dir_lock(settings.DATA_DIR, port, allow_shared_data_dir):
                self._serve(host, port, web_workers, threads, gpus, stop_grace, insecure)
        except ServeRefused as refused:
            raise CommandError(str(refused)) from None

    def _serve(
        self,
        host: str,
        port: int,
        web_workers: int,
        threads: int,
        gpus: str,
        stop_grace: float,
        insecure: bool,
    ) -> None:
        call_command("migrate", interactive=False, verbosity=1)
        self.stdout.write(access_mode(host, insecure))
        supervise(
            service_processes(host, port, web_workers, threads, gpus),
            stop_grace,
            ready=(
                f"SDXL LoRA service on http://{host}:{port}/ (data dir {settings.DATA_DIR}); "
                f"press Ctrl-C to stop (the processes get {stop_grace:g}s to finish)"
            ),
            write=self.stdout.write,
            write_error=self.stderr.write,
        )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def access_mode(host: str, insecure: bool) -> str:
    """The start-up line saying who may use the API; refuses an open API on the network."""
    if api_tokens_configured():
        return "access: API tokens required (Authorization: Bearer <token>) on every endpoint"
    if is_loopback(host):
        return (
            f"access: no API token configured, so the API is open, served on loopback "
            f"{host} only; set SDXL_API_TOKENS or create a token in the admin to serve others"
        )
    if insecure:
        return (
            f"access: INSECURE: no API token configured and serving {host}; anyone who can "
            "reach it can use the API (--insecure)"
        )
    raise CommandError(
        f"refusing to serve the API on {host} without an API token: set SDXL_API_TOKENS or "
        "create a token in the admin, or pass --insecure to serve it open anyway"
    )
