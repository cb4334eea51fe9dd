"""`manage.py serve`: migrations, then the web server and both worker clusters together.

The web server is gunicorn (threaded workers: /txt2img waits for its image); the training
and generation queues each get their own worker so generation never waits behind a run.
Ctrl-C or SIGTERM stops all three; if one dies, the others are stopped too.

Without an API token configured, the API is open to whoever reaches it, so it is served
on a loopback address only, unless the operator passes --insecure.
"""

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from access_app.selectors import api_tokens_configured

STOP_GRACE_S = 30.0


class Command(BaseCommand):
    help = "Migrates the database, then runs the web server and the worker clusters."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--web-workers", type=int, default=2)
        parser.add_argument("--threads", type=int, default=8, help="threads per web worker")
        parser.add_argument(
            "--gpus",
            default=",".join(settings.SDXL_GPUS),
            help="GPU indices, e.g. 0,1: one training and one generation worker per GPU, "
            "pinned with CUDA_VISIBLE_DEVICES (default: one of each, on whatever is visible)",
        )
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="serve a non-loopback --host even though no API token is configured",
        )

    def handle(
        self,
        *args,
        host: str,
        port: int,
        web_workers: int,
        threads: int,
        gpus: str,
        insecure: bool,
        **options,
    ):
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=1)
        self.stdout.write(access_mode(host, insecure))
        processes = service_processes(host, port, web_workers, threads, gpus)
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        children = {
            name: subprocess.Popen(command, cwd=settings.BASE_DIR, env=environment)
            for name, (command, environment) in processes.items()
        }
        self.stdout.write(
            f"SDXL LoRA service on http://{host}:{port}/ (data dir {settings.DATA_DIR}); "
            "press Ctrl-C to stop"
        )
        exit_code = 0
        while not stopping:
            crashed = [name for name, child in children.items() if child.poll() is not None]
            if crashed:
                self.stderr.write(f"{', '.join(crashed)} exited; stopping the service")
                exit_code = 1
                break
            time.sleep(0.5)
        self._stop(children)
        if exit_code:
            sys.exit(exit_code)

    def _stop(self, children: dict[str, subprocess.Popen]) -> None:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, child in children.items():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in {STOP_GRACE_S:.0f}s; killing it")
                child.kill()
                child.wait()
        self.stdout.write("stopped")


def service_processes(
    host: str, port: int, web_workers: int, threads: int, gpus: str
) -> dict[str, tuple[list[str], dict | None]]:
    """Name -> (command, environment or None to inherit) of every process `serve` starts."""
    manage_py = str(Path(settings.BASE_DIR) / "manage.py")
    web = [
        sys.executable, "-m", "gunicorn", "sdxl_service.wsgi:application",
        "--bind", f"{host}:{port}",
        "--worker-class", "gthread",
        "--workers", str(web_workers),
        "--threads", str(threads),
        "--graceful-timeout", "10",
        "--access-logfile", "-",
    ]  # fmt: skip
    processes = {"web": (web, None)}
    for gpu in [g.strip() for g in gpus.split(",") if g.strip()] or [None]:
        # All workers serve the same two queues; each GPU adds one of each.
        environment = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        for queue in ("training", "generation"):
            name = f"{queue} worker" + (f" (GPU {gpu})" if gpu is not None else "")
            processes[name] = ([sys.executable, manage_py, "worker", queue], environment)
    return processes


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
