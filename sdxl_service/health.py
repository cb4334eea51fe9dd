"""The service's health, as the front door (/) shows it to a person and /healthz answers
load balancers: the database, django-q2's broker and the two kinds of worker, each ok or not
with a short reason.

The reasons name no secret and nothing a caller without a token should learn: no database
name or path, no broker URL, no host names; a failure is named by its exception's class,
never its message (which may carry a host or a URL with a password).

- "down" (HTTP 503): the database cannot be queried or the broker is not reachable; this web
  process cannot serve the API, so a load balancer should take it out of rotation.
- "degraded" (HTTP 200): both are fine but a generation or training worker has no fresh
  heartbeat. The web process itself is healthy (sessions, uploads, queued training all
  work; /txt2img answers 503 until a generation worker runs), and taking it out of
  rotation would not bring a worker back.
- "ok" (HTTP 200): everything is fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection

from training_app.queue_selectors import jobs_waiting
from training_app.selectors import worker_alive

OK, DEGRADED, DOWN = "ok", "degraded", "down"
CHECK_NAMES = ("database", "broker", "generation_worker", "training_worker")


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str


@dataclass(frozen=True)
class Health:
    status: str  # OK, DEGRADED or DOWN
    checks: dict[str, Check]

    @property
    def http_status(self) -> int:
        return 503 if self.status == DOWN else 200

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checks": {
                name: {"ok": check.ok, "reason": check.reason}
                for name, check in self.checks.items()
            },
        }


def _failure(error: BaseException) -> str:
    return type(error).__name__


def database_check() -> Check:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as error:  # any failure to query is the answer, never a 500
        return Check(False, f"cannot be queried ({_failure(error)})")
    return Check(True, f"{connection.vendor}: answers queries")


def broker_kind() -> str:
    return "Redis" if settings.REDIS_URL else "ORM (in the database)"


def broker_check() -> Check:
    """The broker answers; the jobs waiting are the database's queued rows (a broker's
    queue size misses the tasks a worker already took out while its one job runs)."""
    from django_q.brokers import get_broker

    kind = broker_kind()
    try:
        for queue in (settings.TRAINING_QUEUE, settings.GENERATION_QUEUE):
            get_broker(queue).ping()
        waiting = jobs_waiting()
    except Exception as error:  # Redis down, a bad URL, the ORM broker's table unreadable
        return Check(False, f"django-q2 {kind} broker not reachable ({_failure(error)})")
    counts = ", ".join(f"{count} {name}" for name, count in waiting.items())
    return Check(True, f"django-q2 {kind} broker: reachable, jobs waiting: {counts}")


def worker_check(kind: str, queue: str, database: Check) -> Check:
    stale_after = f"{settings.SDXL_WORKER_STALE_AFTER:g} s"
    if not database.ok:
        return Check(False, "unknown: the database cannot be queried")
    try:
        alive = worker_alive(queue)
    except Exception as error:
        return Check(False, f"unknown: heartbeats cannot be read ({_failure(error)})")
    if alive:
        return Check(True, f"alive: a heartbeat on {queue} within the last {stale_after}")
    consequence = (
        "/txt2img answers 503 until one runs"
        if kind == "generation"
        else "training runs wait in the queue until one runs"
    )
    return Check(
        False, f"none alive: no heartbeat on {queue} within the last {stale_after}; {consequence}"
    )


def service_health() -> Health:
    database = database_check()
    broker = broker_check()
    checks = {
        "database": database,
        "broker": broker,
        "generation_worker": worker_check("generation", settings.GENERATION_QUEUE, database),
        "training_worker": worker_check("training", settings.TRAINING_QUEUE, database),
    }
    if not (database.ok and broker.ok):
        status = DOWN
    elif all(check.ok for check in checks.values()):
        status = OK
    else:
        status = DEGRADED
    return Health(status, checks)
