"""The API's edges under faults, through the real gunicorn (issue 15): a database held by
another writer answers 503 with Retry-After, a full data dir 507, each leaving nothing
half-made and working again once the fault is gone; chunked bodies are read; a request
that leaves height and width out keeps to SDXL_MAX_IMAGE_SIDE."""

import base64
import io
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.db import connection
from PIL import Image
from urllib3 import encode_multipart_formdata

from sessions_app import services as session_services
from sessions_app import storage
from sessions_app.models import Session, TrainingImage
from tests.helpers import image_bytes
from tests.processes import processes_with_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# The web server's wait for a lock in these tests (SDXL_WEB_DB_LOCK_TIMEOUT; 10 s by default).
LOCK_WAIT_S = 2
# Longer than that, and long enough to see that a write is not kept waiting.
HELD_S = 8
BUSY_MESSAGE = "the database is busy"


def assert_no_service_process_left(service_processes, queue_namespace: str) -> None:
    service_processes.kill_all()
    # SIGKILLed processes of the group may take a moment to end (their parent reaps them).
    wait_until(
        lambda: not processes_with_env("SDXL_QUEUE_NAMESPACE", queue_namespace),
        10,
        "the service's processes to end",
    )


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def group_folders(session_id: int) -> list[Path]:
    folder = storage.session_dir(session_id)
    return sorted(folder.iterdir()) if folder.exists() else []


class HeldDatabase:
    """Another connection holding the database against writers: SQLite's write lock
    (`BEGIN IMMEDIATE`), or PostgreSQL's ACCESS EXCLUSIVE lock on the sessions table."""

    def __init__(self):
        self.database = connection.settings_dict
        self.sqlite = self.database["ENGINE"] == "django.db.backends.sqlite3"
        self.outside = None

    def hold(self) -> None:
        if self.sqlite:
            self.outside = sqlite3.connect(self.database["NAME"], isolation_level=None)
            self.outside.execute("BEGIN IMMEDIATE")
            return
        import psycopg

        self.outside = psycopg.connect(
            host=self.database["HOST"] or "127.0.0.1",
            port=self.database["PORT"] or 5432,
            user=self.database["USER"],
            password=self.database["PASSWORD"] or None,
            dbname=self.database["NAME"],
        )
        self.outside.execute(f"LOCK TABLE {Session._meta.db_table} IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        if self.outside is not None:
            self.outside.rollback()
            self.outside.close()
            self.outside = None


@pytest.fixture
def held_database():
    held = HeldDatabase()
    yield held
    held.release()


def test_database_held_by_another_writer_answers_503_then_works_again(
    service_processes, queue_namespace, held_database
):
    server = service_processes.gunicorn(SDXL_WEB_DB_LOCK_TIMEOUT=str(LOCK_WAIT_S))
    session = session_services.session_create()
    sessions_before = Session.objects.count()
    image = base64.b64encode(image_bytes("PNG")).decode()
    held_database.hold()
    held_at = time.monotonic()

    created, create_s = timed(lambda: requests.get(f"{server}/create_session", timeout=60))
    posted, post_s = timed(
        lambda: requests.post(
            f"{server}/post_session_image",
            json={"session_id": session.pk, "image_base64": image, "prompt": "a red square"},
            timeout=60,
        )
    )
    for response, seconds in ((created, create_s), (posted, post_s)):
        assert response.status_code == 503, response.text
        assert response.json()["status"] == "error"
        assert BUSY_MESSAGE in response.json()["message"]
        assert int(response.headers["Retry-After"]) >= 1
        # Answered after the web server's wait, not after the workers' 30 s.
        assert LOCK_WAIT_S - 0.5 <= seconds < LOCK_WAIT_S + 10, seconds
    print(f"\nheld: create_session 503 after {create_s:.2f}s, post_session_image {post_s:.2f}s")

    # Held for HELD_S in all (longer on a slow machine), then released: writes are accepted
    # again at once.
    time.sleep(max(0.0, HELD_S - (time.monotonic() - held_at)))
    held_database.release()
    print(f"held for {time.monotonic() - held_at:.1f}s")
    released_at = time.monotonic()
    created_again = requests.get(f"{server}/create_session", timeout=60)
    accepted_s = time.monotonic() - released_at
    assert created_again.status_code == 200, created_again.text
    posted_again = requests.post(
        f"{server}/post_session_image",
        json={"session_id": session.pk, "image_base64": image, "prompt": "a red square"},
        timeout=60,
    )
    assert posted_again.status_code == 200, posted_again.text
    print(f"released: create_session accepted {accepted_s:.2f}s after the release")
    assert accepted_s < LOCK_WAIT_S

    # Nothing the refused writes began was kept: one new session, one image, one folder.
    assert Session.objects.count() == sessions_before + 1
    assert TrainingImage.objects.filter(group__session=session).count() == 1
    assert len(group_folders(session.pk)) == 1
    assert_no_service_process_left(service_processes, queue_namespace)


@contextmanager
def tmpfs_on(folder: Path, size: str) -> Iterator[Path]:
    """`folder` on a tmpfs of `size` (mount's `size=` option), so that it can be filled;
    unmounted afterwards. Skips the test, saying why, where it cannot mount one (not root)."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.fixture
def small_data_dir(data_dir):
    """The data dir on a 1 MiB tmpfs."""
    with tmpfs_on(data_dir, "1m"):
        yield data_dir


def fill(folder: Path) -> Path:
    """Writes a file into `folder` until its file system has no space left."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC
    return filler


def test_full_data_dir_answers_507_and_the_next_upload_after_freeing_space_works(
    service_processes, queue_namespace, small_data_dir
):
    server = service_processes.gunicorn()
    session_id = requests.get(f"{server}/create_session", timeout=60).json()["session_id"]
    png = image_bytes("PNG")
    body = {"session_id": session_id, "image_base64": base64.b64encode(png).decode()}
    filler = fill(small_data_dir)

    refused = requests.post(
        f"{server}/post_session_image", json={**body, "prompt": "full"}, timeout=60
    )
    assert refused.status_code == 507, refused.text
    assert refused.json() == {
        "status": "error",
        "message": "no space left on the device of the data dir (SDXL_DATA_DIR): "
        "free some space and retry",
    }
    # Neither a row nor a file (nor a temporary one) of the refused image is left.
    assert TrainingImage.objects.count() == 0
    assert group_folders(session_id) == []
    assert not [path for path in small_data_dir.rglob("*") if path.name.endswith(".tmp")]

    filler.unlink()
    accepted = requests.post(
        f"{server}/post_session_image", json={**body, "prompt": "room again"}, timeout=60
    )
    assert accepted.status_code == 200, accepted.text
    image = TrainingImage.objects.get()
    assert (settings.DATA_DIR / image.file).read_bytes() == png
    assert_no_service_process_left(service_processes, queue_namespace)


def chunks(data: bytes, size: int = 1000):
    """A generator body: requests sends it with Transfer-Encoding: chunked."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_chunked_json_and_multipart_bodies_are_read_and_limited(service_processes, queue_namespace):
    server = service_processes.gunicorn(SDXL_MAX_BODY_MB="1", SDXL_MAX_UPLOAD_MB="1")
    session = session_services.session_create()
    png = image_bytes("PNG")
    body = {"session_id": session.pk, "image_base64": base64.b64encode(png).decode()}
    as_json = json.dumps({**body, "prompt": "chunked json"}).encode()

    sent = requests.post(
        f"{server}/post_session_image",
        data=chunks(as_json),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert sent.request.headers.get("Transfer-Encoding") == "chunked"
    assert sent.status_code == 200, sent.text

    multipart, content_type = encode_multipart_formdata(
        [("image", ("a.png", png, "image/png")), ("caption", "chunked multipart")]
    )
    uploaded = requests.post(
        f"{server}/sessions/{session.pk}/images",
        data=chunks(multipart),
        headers={"Content-Type": content_type},
        timeout=60,
    )
    assert uploaded.status_code == 200, uploaded.text
    assert [image["caption"] for image in uploaded.json()["images"]] == ["chunked multipart"]

    too_big = json.dumps({**body, "prompt": "x" * (1024 * 1024)}).encode()
    refused = requests.post(
        f"{server}/post_session_image",
        data=chunks(too_big, 64 * 1024),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert refused.status_code == 413, refused.text
    assert "larger than the limit of 1 MB" in refused.json()["message"]

    captions = TrainingImage.objects.filter(group__session=session).order_by("group__number")
    assert [image.caption for image in captions] == ["chunked json", "chunked multipart"]
    assert_no_service_process_left(service_processes, queue_namespace)


@pytest.mark.one_pass
def test_defaults_keep_to_a_small_max_image_side(service_processes, queue_namespace):
    limit = {"SDXL_MAX_IMAGE_SIDE": "100"}  # 96 is the largest multiple of 8 within it
    server = service_processes.gunicorn(SDXL_TXT2IMG_TIMEOUT="300", **limit)
    schema = requests.get(f"{server}/api/schema", params={"format": "json"}, timeout=60).json()
    request = schema["components"]["schemas"]["Txt2Img"]["properties"]
    for side in ("height", "width"):
        # Left out: the model's native size, capped at the limit (no fixed default).
        assert "default" not in request[side] and request[side]["maximum"] == 96
        assert request[side]["multipleOf"] == 8

    service_processes.worker("generation", **limit)
    answered = requests.post(
        f"{server}/txt2img", json={"prompt": "a red square", "steps": 5}, timeout=400
    )
    assert answered.status_code == 200, answered.text
    (image,) = answered.json()["images_base64"]
    # The tiny model's native 64² is within the limit (a larger native size is capped at
    # it: tests/sdxl_service/api/test_fast_defaults.py).
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (64, 64)
    refused = requests.post(
        f"{server}/txt2img", json={"prompt": "a red square", "height": 104}, timeout=60
    )
    assert refused.status_code == 400
    assert refused.json()["message"] == "height: Ensure this value is less than or equal to 96."
    assert_no_service_process_left(service_processes, queue_namespace)
