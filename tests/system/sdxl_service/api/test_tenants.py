"""An owner's quota under a race: two gunicorn processes take one concurrent training slot
once (the rest of the owners' rules: tests/sdxl_service/api/test_tenants.py)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.sdxl_service.api.test_tenants import set_quotas, tenant
from training_app.models import TrainingRun


def _race_to_train(url: str, token: str, session_ids: list[int]) -> list[requests.Response]:
    """/train_lora for each session at the same moment; the answers, 2xx first."""
    start = threading.Barrier(len(session_ids))

    def train(session_id: int) -> requests.Response:
        start.wait()
        return requests.post(
            f"{url}/train_lora",
            json={"session_id": session_id, "steps": 1},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    with ThreadPoolExecutor(len(session_ids)) as pool:
        return sorted(pool.map(train, session_ids), key=lambda r: r.status_code)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)  # the server's processes see what the test writes
def test_two_trainings_of_one_owner_at_once_take_one_slot_of_its_quota(service_processes):
    """Two gunicorn processes, two threads each: an owner with a quota of one concurrent
    training starts two sessions' trainings at the same moment, in 5 rounds (a fresh owner
    each): one starts, the other answers 429, and one run exists."""
    url = service_processes.gunicorn(workers=2, threads=2)
    for round_number in range(5):
        racer = tenant(f"racer {round_number}")
        set_quotas(racer, max_concurrent_trainings=1)
        sessions = []
        for _ in range(2):
            session = session_services.session_create(owner_id=racer.owner.pk)
            session_services.session_image_add(session.pk, image_bytes(), "a red square")
            sessions.append(session.pk)
        responses = _race_to_train(url, racer.token, sessions)
        assert [r.status_code for r in responses] == [200, 429], [r.text for r in responses]
        assert "concurrent trainings" in responses[1].json()["message"]
        assert TrainingRun.objects.filter(session__owner=racer.owner).count() == 1
