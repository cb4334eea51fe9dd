"""The service's own processes (gunicorn, workers), started against the test database.

Used with pytest-django's `transactional_db`: rows the test writes are committed, so the
processes see them, and the processes are stopped before the tables are flushed.
"""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def suite_database_url() -> str:
    """The URL of the database this test runs on (pytest-django's test database)."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    password = f":{quote(db['PASSWORD'], safe='')}" if db["PASSWORD"] else ""
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    return f"postgres://{quote(db['USER'], safe='')}{password}@{host}:{port}/{db['NAME']}"


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval=0.1):
    """Polls `predicate` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ServiceProcess:
    """One process (and its children: its own process group), logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the whole process group: no handler runs, nothing is cleaned up."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log.close()


class ServiceProcesses:
    """Starts gunicorn and workers with the test's data dir, database and queues."""

    def __init__(self, data_dir: Path, model_cache_dir: Path, queue_namespace: str):
        self.data_dir = data_dir
        self.started: list[ServiceProcess] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SDXL_", "DJANGO_"))},
            "DATABASE_URL": suite_database_url(),
            "SDXL_DATA_DIR": str(data_dir),
            "SDXL_MODEL_CACHE_DIR": str(model_cache_dir),
            "SDXL_MODEL_PRESET": "tiny",
            "SDXL_QUEUE_NAMESPACE": queue_namespace,
            "PYTHONUNBUFFERED": "1",
        }

    def _start(self, name: str, command: list[str], env: dict) -> ServiceProcess:
        log_path = self.data_dir.parent / f"{name}-{len(self.started)}.log"
        process = ServiceProcess(name, command, {**self.env, **env}, log_path)
        self.started.append(process)
        return process

    def gunicorn(self, workers: int | None = None, threads: int | None = None, **env: str) -> str:
        """Starts the web server as `serve` runs it (its worker and thread counts unless
        given); returns its base URL once it answers."""
        from training_app.workers.supervisor import (
            WEB_THREADS,
            WEB_WORKERS,
            gunicorn_command,
        )

        port = free_port()
        command = gunicorn_command(
            f"127.0.0.1:{port}",
            WEB_WORKERS if workers is None else workers,
            WEB_THREADS if threads is None else threads,
        )
        process = self._start("gunicorn", command, env)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert process.process.poll() is None, process.log()
            try:
                return requests.get(f"{url}/list_sessions", timeout=5).status_code in (200, 401)
            except requests.RequestException:  # not listening yet, or a slow first answer
                return False

        wait_until(answers, 60, "gunicorn to answer", interval=0.2)
        return url

    def worker(self, queue: str = "training", **env: str) -> ServiceProcess:
        """Starts `manage.py worker <queue>`; returns once its heartbeat row is written."""
        from training_app.models import WorkerHeartbeat

        process = self._start(
            f"worker-{queue}", [sys.executable, "manage.py", "worker", queue], env
        )

        def beating() -> bool:
            assert process.process.poll() is None, process.log()
            return WorkerHeartbeat.objects.filter(pid=process.pid).exists()

        wait_until(beating, 60, f"the {queue} worker's heartbeat", interval=0.2)
        return process

    def serve(self, *args: str, **env: str) -> tuple[ServiceProcess, str]:
        """Starts `manage.py serve` (one web worker unless told); returns it and its base URL
        once it answers and both workers beat."""
        from django.conf import settings

        from training_app.models import WorkerHeartbeat

        port = free_port()
        command = [sys.executable, "manage.py", "serve", "--port", str(port), *args]
        if "--web-workers" not in args:
            command += ["--web-workers", "1"]
        process = self._start("serve", command, env)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.process.poll() is None, process.log()
            try:
                requests.get(f"{url}/list_sessions", timeout=2)
            except requests.RequestException:
                return False
            queues = set(WorkerHeartbeat.objects.values_list("queue", flat=True))
            return queues == {settings.TRAINING_QUEUE, settings.GENERATION_QUEUE}

        wait_until(up, 90, "serve to answer and both workers to beat", interval=0.3)
        return process, url

    def kill_all(self) -> None:
        # Killed rather than stopped: the test's database is flushed next, so a graceful
        # stop (seconds per process) would tidy up nothing that matters.
        for process in self.started:
            process.kill()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (state, ppid, pgrp, ...), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_tree(root: int) -> dict[int, str]:
    """pid -> start time (to tell a reused pid apart) of `root` and all its descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return {pid: fields[19] for pid in tree if (fields := _proc_stat(pid))}


def still_running(tree: dict[int, str]) -> list[int]:
    """The processes of `tree` (from process_tree) that still run: zombies count as ended."""
    running = []
    for pid, started in tree.items():
        fields = _proc_stat(pid)
        if fields and fields[19] == started and fields[0] != "Z":
            running.append(pid)
    return running


def processes_with_env(name: str, value: str) -> list[int]:
    """The running processes (zombies aside) whose environment has name=value: all that a
    process started with it started in turn, orphans included."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        fields = _proc_stat(int(entry.name))
        if wanted in environ.split(b"\0") and fields and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """The running processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@contextmanager
def database_away():
    """The suite's database refuses the service's writes while the block runs.

    SQLite: an outside connection holds the write lock (BEGIN IMMEDIATE), so every write
    waits its timeout, then fails "database is locked" (reads go on, WAL). PostgreSQL: the
    database takes no new connections and every other connection to it is ended, as when
    the server restarts; the test's own connection is kept.
    """
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        holder = sqlite3.connect(db["NAME"], timeout=60, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    import psycopg

    # From the maintenance database: PostgreSQL refuses this for the one connected to.
    admin = psycopg.connect(
        dbname="postgres",
        user=db["USER"],
        password=db["PASSWORD"] or None,
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        autocommit=True,
    )
    name = connection.ops.quote_name(db["NAME"])
    try:
        admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> %s",
                [db["NAME"], connection.cursor().connection.info.backend_pid],
            )
            yield
        finally:
            admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    finally:
        admin.close()
