import pytest
from django.utils import timezone

from training_app.models import WorkerHeartbeat


@pytest.fixture
def generation_worker(settings):
    """A heartbeat as the generation worker writes it; the jobs run in-process here.

    Written once, so it must count as fresh for the whole test, however slow the machine
    (a test that trains and generates can take 15 s, the default staleness, on a busy one).
    """
    settings.SDXL_WORKER_STALE_AFTER = 3600
    return WorkerHeartbeat.objects.create(
        queue=settings.GENERATION_QUEUE,
        host="test",
        pid=1,
        started_at=timezone.now(),
        last_seen=timezone.now(),
    )
