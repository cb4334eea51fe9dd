"""Redis, the broker, stopped under the real gunicorn (issue 26, point 4): /train_lora and an
async /txt2img answer 503 with Retry-After and record nothing; once Redis is back, the
client's retries with their Idempotency-Keys start one job each, and further retries get
the same answers without a second job."""

import shutil
import subprocess

import pytest
import redis
import requests
from django.conf import settings

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.processes import free_port, wait_until
from training_app.jobs import BROKER_RETRY_AFTER_S
from training_app.models import Generation, TrainingRun

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that it stops and starts again."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.folder = tmp_path
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=self.port, socket_connect_timeout=1)

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(self._answers, 20, "redis-server to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def tasks(self, queue: str) -> int:
        return int(self.client.llen(f"django_q:{queue}:q"))


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_stopped_answers_503_and_the_retries_start_one_job_each(
    service_processes, private_redis, generation_worker
):
    url = service_processes.gunicorn(
        REDIS_URL=f"redis://127.0.0.1:{private_redis.port}/0",
        # The test's worker heartbeat row counts as a live generation worker throughout.
        SDXL_WORKER_STALE_AFTER="3600",
    )
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    requests_made = {
        "training": ("/train_lora", {"session_id": session.pk, "steps": 1}, "train-1"),
        "generation": ("/txt2img", {"prompt": "a red square", "async": True}, "txt2img-1"),
    }

    def post(kind: str) -> requests.Response:
        path, body, key = requests_made[kind]
        return requests.post(
            f"{url}{path}", json=body, headers={"Idempotency-Key": key}, timeout=30
        )

    private_redis.stop()
    for kind in requests_made:
        refused = post(kind)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == str(BROKER_RETRY_AFTER_S)
        assert "nothing was recorded" in refused.json()["message"]
    assert not TrainingRun.objects.exists() and not Generation.objects.exists()

    private_redis.start()
    first = {kind: post(kind) for kind in requests_made}
    again = {kind: post(kind) for kind in requests_made}

    assert first["training"].status_code == 200, first["training"].text
    assert first["generation"].status_code == 202, first["generation"].text
    for kind in requests_made:
        assert again[kind].status_code == first[kind].status_code
        assert again[kind].content == first[kind].content
        assert again[kind].headers["Idempotent-Replayed"] == "true"
    assert TrainingRun.objects.count() == 1 and Generation.objects.count() == 1
    assert private_redis.tasks(settings.TRAINING_QUEUE) == 1
    assert private_redis.tasks(settings.GENERATION_QUEUE) == 1
