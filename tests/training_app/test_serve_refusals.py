"""`serve` refuses to start, before anything starts, on a port in use or a data dir
another serve holds (issue 25, point 9; tests/system/training_app/test_serve_twice.py
runs it as real processes)."""

import fcntl
import socket

import pytest
from django.core.management import CommandError, call_command

from training_app.management.commands import serve as serve_command
from training_app.workers.supervisor import SERVE_LOCK_NAME

pytestmark = pytest.mark.django_db


@pytest.fixture
def nothing_starts(monkeypatch):
    started = []
    monkeypatch.setattr(serve_command, "supervise", lambda *a, **k: started.append(a))
    monkeypatch.setattr(serve_command, "call_command", lambda *a, **k: started.append(a))
    return started


def test_a_port_in_use_is_refused_before_anything_starts(nothing_starts):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(CommandError, match=f"port {port} is in use"):
            call_command("serve", port=port)
    assert nothing_starts == []


def test_a_data_dir_held_by_another_serve_is_refused_unless_allowed(nothing_starts, data_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / SERVE_LOCK_NAME).open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242, port 8000\n")
        held.flush()
        with pytest.raises(
            CommandError,
            match=f"another serve \\(pid 4242, port 8000\\) already uses the data dir {data_dir}",
        ):
            call_command("serve", port=port)
        assert nothing_starts == []

        call_command("serve", port=port, allow_shared_data_dir=True)
        assert len(nothing_starts) == 2  # migrate, then the processes


def test_serve_holds_the_data_dir_lock_while_it_runs_and_frees_it(monkeypatch, data_dir):
    seen = []

    def supervise(*args, **kwargs):
        lock = (data_dir / SERVE_LOCK_NAME).open("a")
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append((data_dir / SERVE_LOCK_NAME).read_text())
        lock.close()

    monkeypatch.setattr(serve_command, "supervise", supervise)
    monkeypatch.setattr(serve_command, "call_command", lambda *a, **k: None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    call_command("serve", port=port)
    assert seen and seen[0].startswith("pid ") and f"port {port}" in seen[0]
    with (data_dir / SERVE_LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
