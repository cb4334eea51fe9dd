"""A full disk under the SQLite database (issue 26), through the real gunicorn: writes answer
507, reads keep answering, and writes work again once space is freed, with no restart."""

import base64
import sqlite3
import time
from contextlib import closing

import pytest
import requests
from django.db import connection

from tests.helpers import image_bytes
from tests.system.sdxl_service.test_api_faults import (
    assert_no_service_process_left,
    fill,
    tmpfs_on,
)

# SQLite only: the PostgreSQL + Redis pass has nothing of its own to add.
pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.one_pass]

NO_SPACE = "no space left on the device of"


@pytest.fixture
def database_in_small_data_dir(data_dir):
    """The data dir on a 4 MiB tmpfs holding a copy of the (migrated, empty) test database,
    as a data dir holds SQLite by default; unmounted afterwards."""
    if connection.vendor != "sqlite":
        pytest.skip("the database is SQLite's file")
    with tmpfs_on(data_dir, "4m"):
        database = data_dir / "db.sqlite3"
        with closing(sqlite3.connect(connection.settings_dict["NAME"])) as suite:
            with closing(sqlite3.connect(database)) as copy:
                suite.backup(copy)
        yield database


def test_full_disk_under_sqlite_refuses_writes_with_507_keeps_reads_and_recovers(
    service_processes, queue_namespace, data_dir, database_in_small_data_dir
):
    server = service_processes.gunicorn(DATABASE_URL=f"sqlite:///{database_in_small_data_dir}")
    session_id = requests.get(f"{server}/create_session", timeout=60).json()["session_id"]
    body = {"session_id": session_id, "image_base64": base64.b64encode(image_bytes()).decode()}

    def upload(prompt: str) -> requests.Response:
        return requests.post(
            f"{server}/post_session_image", json={**body, "prompt": prompt}, timeout=60
        )

    assert upload("before").status_code == 200
    # The server closes its connection after answering; filled once it has, as a disk
    # fills between requests.
    time.sleep(1)
    filler = fill(data_dir)

    for refused in (upload("full"), requests.get(f"{server}/create_session", timeout=60)):
        assert refused.status_code == 507, refused.text
        assert refused.json()["message"].startswith(NO_SPACE)
    listed = requests.get(f"{server}/list_sessions", timeout=60)
    assert listed.status_code == 200, listed.text
    assert [item["session_id"] for item in listed.json()["sessions"]] == [str(session_id)]
    status = requests.post(f"{server}/train_status", json={"session_id": session_id}, timeout=60)
    assert status.status_code == 200, status.text
    detail = requests.get(f"{server}/sessions/{session_id}", timeout=60)
    assert detail.status_code == 200, detail.text
    image = requests.get(f"{server}{detail.json()['images'][0]['url']}", timeout=60)
    assert (image.status_code, image.content) == (200, image_bytes())

    filler.unlink()
    assert upload("room again").status_code == 200
    captions = [
        image["caption"]
        for image in requests.get(f"{server}/sessions/{session_id}", timeout=60).json()["images"]
    ]
    # The refused upload left nothing behind.
    assert captions == ["before", "room again"]
    assert_no_service_process_left(service_processes, queue_namespace)
