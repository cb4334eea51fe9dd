"""50 uploads at once to one session, through the real web server (gunicorn, 2 processes
x 8 threads), on whichever database the suite runs: every one lands, whole, numbered once."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import ImageGroup, TrainingImage
from tests.helpers import b64, image_bytes

pytestmark = pytest.mark.e2e

UPLOADS = 50


def test_50_concurrent_uploads_to_one_session(service_processes):
    url = service_processes.gunicorn(workers=2, threads=8)
    session = session_services.session_create()
    # Every upload distinct: its own size, colour and caption.
    uploads = [
        (image_bytes("PNG", (32 + i, 40), (5 * i, 255 - 5 * i, 7 * i % 256)), f"caption {i} ✓")
        for i in range(UPLOADS)
    ]
    start = threading.Barrier(UPLOADS)

    def upload(index: int) -> requests.Response:
        image, caption = uploads[index]
        body = {"session_id": str(session.pk), "image_base64": b64(image), "prompt": caption}
        start.wait()
        return requests.post(f"{url}/post_session_image", json=body, timeout=120)

    with ThreadPoolExecutor(UPLOADS) as pool:
        responses = list(pool.map(upload, range(UPLOADS)))

    assert [r.status_code for r in responses] == [200] * UPLOADS, [r.text for r in responses]
    assert all(r.json() == {"status": "success"} for r in responses)
    logs = "".join(process.log() for process in service_processes.started)
    assert "database is locked" not in logs and "Traceback" not in logs

    groups = ImageGroup.objects.filter(session=session)
    assert sorted(groups.values_list("number", flat=True)) == list(range(UPLOADS))
    folder = storage.session_dir(session.pk)
    assert sorted(int(p.name) for p in folder.iterdir()) == list(range(UPLOADS))
    stored = set()
    for group in groups:
        group_dir = folder / str(group.number)
        assert sorted(p.name for p in group_dir.iterdir()) == ["0.png", "0.txt"]
        image, caption = (group_dir / "0.png").read_bytes(), (group_dir / "0.txt").read_text()
        row = TrainingImage.objects.get(group=group)
        assert (row.caption, row.sha256) == (caption, storage.sha256_bytes(image))
        stored.add((image, caption))
    assert stored == set(uploads)  # each upload exactly once, image and caption together
    session.refresh_from_db()
    assert session.next_group_number == UPLOADS
