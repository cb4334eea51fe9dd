"""Shared fixtures: an isolated data dir per test, one tiny model build per test run."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """On SQLite the test database is a file, not pytest-django's default in-memory one.

    Tests that run the real server or a worker as another process (or the live server's
    threads, each with its own connection) must all open the same database; an in-memory
    one is private to a single connection.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        test_db = tmp_path_factory.mktemp("database") / "test.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(test_db)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """The tiny random-weight SDXL pair is written once per test run, here."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def data_dir(settings, tmp_path, model_cache_dir) -> Path:
    """Every test gets its own empty data dir; nothing touches ./media."""
    root = tmp_path / "data"
    root.mkdir()
    settings.DATA_DIR = root
    settings.SESSION_DATA_DIR = root / "session_data"
    settings.GENERATIONS_DIR = root / "generations"
    settings.MODEL_CACHE_DIR = model_cache_dir
    settings.SDXL_MODEL_PRESET = "tiny"
    settings.SDXL_API_TOKENS = []
    # Jobs run in-process here, inside the test's transaction: a run's heartbeat thread,
    # on a connection of its own, would wait on SQLite's write lock. Tests of heartbeats
    # and lost runs set their own period.
    settings.SDXL_RUN_STALE_AFTER = 3600.0
    return root


@pytest.fixture
def queue_namespace(settings, monkeypatch) -> Iterator[str]:
    """Queues of this test's own, so workers of other tests (or runs) never take its jobs."""
    from django_q.conf import Conf

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    # django-q2 signs tasks with the cluster name (read once, at import): this process
    # must sign as the workers started with this namespace expect.
    monkeypatch.setattr(Conf, "PREFIX", namespace)
    settings.SDXL_QUEUE_NAMESPACE = namespace
    settings.TRAINING_QUEUE = f"{namespace}-training"
    settings.GENERATION_QUEUE = f"{namespace}-generation"
    yield namespace
    from django_q.brokers import get_broker

    for queue in (settings.TRAINING_QUEUE, settings.GENERATION_QUEUE):
        get_broker(queue).delete_queue()


@pytest.fixture
def service_processes(transactional_db, data_dir, model_cache_dir, queue_namespace):
    """Starts real gunicorn/worker processes on this test's database, data dir and queues;
    all are stopped (before the database is flushed) when the test ends."""
    from tests.processes import ServiceProcesses

    processes = ServiceProcesses(data_dir, model_cache_dir, queue_namespace)
    yield processes
    processes.kill_all()


def _worker_heartbeat(queue: str):
    from django.utils import timezone

    from training_app.models import WorkerHeartbeat

    return WorkerHeartbeat.objects.create(
        queue=queue, host="test", pid=1, started_at=timezone.now(), last_seen=timezone.now()
    )


@pytest.fixture
def training_worker(settings):
    """A heartbeat as the training worker writes it (fresh for the whole test); the jobs
    run in-process here."""
    settings.SDXL_WORKER_STALE_AFTER = 3600
    return _worker_heartbeat(settings.TRAINING_QUEUE)


@pytest.fixture
def generation_worker(settings):
    """A heartbeat as the generation worker writes it; the jobs run in-process here.

    Written once, so it must count as fresh for the whole test, however slow the machine
    (a test that trains and generates can take 15 s, the default staleness, on a busy one).
    """
    settings.SDXL_WORKER_STALE_AFTER = 3600
    return _worker_heartbeat(settings.GENERATION_QUEUE)
