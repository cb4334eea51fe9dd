"""The service's processes as `manage.py serve` runs them: the web server and both worker
clusters together, supervised.

The web server is gunicorn running Django's ASGI application on uvicorn workers
(sdxl_service.web_server: requests are read on an event loop, so slow or idle clients hold
no thread; a synchronous /txt2img waits for its image on one of a bounded number of
threads); the training and generation queues each get their own worker so generation
never waits behind a run.
Ctrl-C or SIGTERM stops all three.

Supervision: a process that exits (a worker whose database stayed away, whose cluster died,
or that was killed) is started again, after what is left of its process group is killed,
with a back-off of RESTART_BACKOFF_S that grows while it keeps dying soon after its start.
The others carry on meanwhile: the web server is never stopped because a worker died, and
is itself started again should it die. Each child also dies with serve (Linux), so a serve
killed with SIGKILL leaves none of them behind.

Stopping: each process `serve` starts runs in a process group of its own, so a Ctrl-C
(SIGINT to the terminal's whole foreground group) or a SIGTERM reaches `serve` alone and
`serve` stops the rest in order: SIGTERM to each (gunicorn finishes its requests for up to
GUNICORN_GRACEFUL_S, a worker lets its cluster finish its current job), then, once
--stop-grace seconds have passed, SIGKILL to every process still left in each group (a
training run cut short resumes from its last checkpoint on the next start). A second
Ctrl-C kills them at once. When they shared serve's group, a Ctrl-C signalled them all at
once, racing serve's own orderly stop (a probe found orphaned django-q2 processes after 2
of 5 Ctrl-Cs), and a worker killed after the grace lost only its main process, not its
cluster's sentinel, pusher, monitor and pool processes.
"""

import errno
import fcntl
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from core.processes import die_with_parent

# How long the processes get to stop on their own before they are killed.
STOP_GRACE_S = 30.0
# A child that exits is started again after a back-off: the first, doubled on each exit
# within RESTART_STABLE_S of its start, up to the last; back to the first once it stays up.
RESTART_BACKOFF_S = (1.0, 30.0)
RESTART_STABLE_S = 60.0
# gunicorn's own grace for requests in flight: a /txt2img still waiting on its generation
# after it is cut off (its client sees the connection close).
GUNICORN_GRACEFUL_S = 10
# How long an idle connection is kept open after an answer for the client's next request:
# it costs a socket, no thread.
KEEP_ALIVE_S = 5

# The web server's thread model. A request holds a thread only while Django handles it:
# reading its head and body, and waiting idle between kept-alive requests, costs a socket
# and (for the body) a coroutine on the process's event loop, never a thread
# (sdxl_service.web_server). A synchronous /txt2img holds its thread for as long as its
# generation takes (sleeping on a 0.1 s database poll, holding one database connection),
# so the threads must outnumber the clients that wait, or every other endpoint queues
# behind them: 2 processes x 32 threads, 64 requests in Django at once; 32 waiting
# /txt2img clients leave 32 threads for the rest (while spread over both processes: each
# accepts whatever connections the kernel hands it, and a process whose slots are all taken
# makes its requests wait for one). Threads rather than processes: a waiting
# thread costs little memory and no CPU; each process is another full copy of Django and
# the app. The database bounds it: each request in Django has its own connection
# (CONN_MAX_AGE 0: closed when the request ends), so at most 64 web connections plus about
# 5 per worker cluster, within PostgreSQL's default max_connections of 100; raising
# --web-workers x --threads past ~85 needs a larger max_connections (or a pooler).
# SQLite: readers never block in WAL mode; writers queue on its lock (30 s timeout).
WEB_WORKERS = 2
WEB_THREADS = 32


# In the data dir, held (flock) by the serve that uses it, for as long as it runs.
SERVE_LOCK_NAME = ".serve.lock"


class ServeRefused(Exception):
    """serve must not start: its port is taken, or another serve uses its data dir."""


def port_free_check(host: str, port: int) -> None:
    """Binds (host, port) for a moment, as gunicorn will: ServeRefused when something
    listens there already (a serve started before, or another program). Checked before
    anything starts, so a second serve never starts a second pair of workers."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ServeRefused(f"cannot serve on {host}: {error}") from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        # As gunicorn binds: a port in TIME_WAIT after the last serve is free; one with a
        # listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeRefused(
                    f"port {port} is in use (on {host}): another serve, or another program, "
                    f"listens there; stop it, or pass --port to serve on another port"
                ) from None
            raise ServeRefused(f"cannot serve on {host}:{port}: {error.strerror}") from None


@contextmanager
def data_dir_lock(data_dir: Path, port: int, allow_shared: bool) -> Iterator[None]:
    """Holds the data dir's serve lock (SERVE_LOCK_NAME, flock) for the block: a second
    serve on the same data dir, even on another port, is refused (ServeRefused, naming
    the first one's pid and the data dir), since two would run two sets of workers on one
    database and one folder. The lock goes with the process: a serve killed with SIGKILL
    leaves no lock behind (its children die with it and never inherit the file).
    `allow_shared` (--allow-shared-data-dir) skips it."""
    if allow_shared:
        yield
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SERVE_LOCK_NAME
    with path.open("a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise ServeRefused(
                f"another serve ({holder}) already uses the data dir {data_dir}; stop it "
                "first, or set SDXL_DATA_DIR to another folder (pass --allow-shared-data-dir "
                "to run a second serve on the same data dir anyway)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, port {port}\n")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            lock.flush()
            fcntl.flock(lock, fcntl.LOCK_UN)


def supervise(
    processes: dict[str, tuple[list[str], dict | None]],
    stop_grace_s: float,
    ready: str,
    write: Callable[[str], object],
    write_error: Callable[[str], object],
) -> None:
    """Starts `processes` (service_processes), writes `ready` once they all are, keeps
    them running until SIGINT or SIGTERM, then stops them (the module's docstring says
    how). `write` and `write_error` get what an operator should see."""
    signals = []

    def request_stop(signum, frame):
        signals.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children: dict[str, subprocess.Popen] = {}
    for name in processes:
        if signals:
            break
        children[name] = _start(processes[name])
    if not signals:
        write(ready)
    _restart_until_stopped(children, processes, signals, write, write_error)
    _stop(children, stop_grace_s, signals, write, write_error)


def _restart_until_stopped(
    children: dict[str, subprocess.Popen],
    processes: dict,
    signals: list,
    write: Callable[[str], object],
    write_error: Callable[[str], object],
) -> None:
    """Until a signal comes: a child that exits has what is left of its process group
    killed and is started again, after a back-off that doubles while it keeps dying
    within RESTART_STABLE_S of its start."""
    started_at = {name: time.monotonic() for name in children}
    backoff_s = dict.fromkeys(children, 0.0)
    restart_at: dict[str, float] = {}
    while not signals:
        now = time.monotonic()
        for name, child in children.items():
            if name in restart_at or child.poll() is None:
                continue
            _kill_group(child)  # its own children, if any outlived it
            lived_s = now - started_at[name]
            backoff_s[name] = (
                min(max(2 * backoff_s[name], RESTART_BACKOFF_S[0]), RESTART_BACKOFF_S[1])
                if lived_s < RESTART_STABLE_S
                else RESTART_BACKOFF_S[0]
            )
            restart_at[name] = now + backoff_s[name]
            write_error(
                f"{name} exited with code {child.returncode} after {lived_s:.0f}s; "
                f"starting it again in {backoff_s[name]:g}s"
            )
        for name in [name for name, due in restart_at.items() if due <= now]:
            del restart_at[name]
            children[name] = _start(processes[name])
            started_at[name] = time.monotonic()
            write(f"{name} started again (pid {children[name].pid})")
        time.sleep(0.2)


def _stop(
    children: dict[str, subprocess.Popen],
    grace_s: float,
    signals: list,
    write: Callable[[str], object],
    write_error: Callable[[str], object],
) -> None:
    """SIGTERM to each child; SIGKILL to what is left of its group after `grace_s`, or at
    once on another signal. Returns when no process of any child's group is left."""
    asked = len(signals)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while True:
        left = [name for name, child in children.items() if _group_alive(child)]
        if not left:
            break
        if len(signals) > asked or time.monotonic() > deadline:
            why = "on a second signal" if len(signals) > asked else f"after {grace_s:g}s"
            write_error(f"{', '.join(left)} still running {why}; killing them")
            for name in left:
                _kill_group(children[name])
            break
        time.sleep(0.1)
    for child in children.values():
        child.wait()
    write("stopped")


def _start(process: tuple[list[str], dict | None]) -> subprocess.Popen:
    """A process group of its own (the group's id is the child's pid): a Ctrl-C reaches
    serve alone, and the group is what is killed if it outstays the grace. It dies with
    serve, should serve itself be killed (Linux: core.processes)."""
    command, environment = process
    return subprocess.Popen(
        command,
        cwd=settings.BASE_DIR,
        env=environment,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=functools.partial(die_with_parent, os.getpid()),
    )


def _group_alive(child: subprocess.Popen) -> bool:
    """Whether the child, or any process left in its process group, still runs."""
    if child.poll() is None:
        return True
    try:
        os.killpg(child.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _only_zombies(child.pid)


def _only_zombies(pgid: int) -> bool:
    """Whether every process of the group has exited and waits to be reaped (by init, for
    orphans): nothing left to stop. False where /proc cannot tell."""
    try:
        states = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid:
                states.append(fields[0])
        return all(state == "Z" for state in states)
    except OSError:
        return False


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def service_processes(
    host: str, port: int, web_workers: int, threads: int, gpus: str
) -> dict[str, tuple[list[str], dict | None]]:
    """Name -> (command, environment or None to inherit) of every process `serve` starts."""
    manage_py = str(Path(settings.BASE_DIR) / "manage.py")
    web = [
        *gunicorn_command(f"{host}:{port}", web_workers, threads),
        "--graceful-timeout", str(GUNICORN_GRACEFUL_S),
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


def gunicorn_command(bind: str, web_workers: int = WEB_WORKERS, threads: int = WEB_THREADS):
    """The web server's command line (the tests start it with serve's defaults too):
    `threads` is how many requests each process lets into Django at once
    (sdxl_service.web_server.WebWorker); connections waiting to be read are not counted."""
    return [
        sys.executable, "-m", "gunicorn", "sdxl_service.asgi:application",
        "--bind", bind,
        "--worker-class", "sdxl_service.web_server.WebWorker",
        "--workers", str(web_workers),
        "--threads", str(threads),
        "--keep-alive", str(KEEP_ALIVE_S),
    ]  # fmt: skip
