"""End to end: `manage.py serve` as a real process (gunicorn + both django-q2 workers),
driven over HTTP through all nine endpoints exactly as docs/api.md shows.

Runs on whatever database and broker the suite runs on: SQLite + ORM broker by default,
PostgreSQL + Redis when DATABASE_URL / REDIS_URL are set (a fresh database is made for it).
"""

import base64
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.helpers import b64, image_bytes
from tests.processes import REPO, process_tree, still_running

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 90
TRAIN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Database:
    """The server's own database (not pytest-django's), for checking rows directly."""

    def __init__(self, data_dir: Path):
        self.postgres_url = None
        url = os.environ.get("DATABASE_URL", "")
        if url.startswith("postgres"):
            import psycopg

            self.admin_url = url
            self.name = f"sdxl_e2e_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(url, autocommit=True) as connection:
                connection.execute(f'CREATE DATABASE "{self.name}"')
            self.postgres_url = url.rsplit("/", 1)[0] + f"/{self.name}"
        self.sqlite_path = data_dir / "db.sqlite3"

    def env(self) -> dict:
        return {"DATABASE_URL": self.postgres_url} if self.postgres_url else {}

    def count(self, sql: str, *params) -> int:
        if self.postgres_url:
            import psycopg

            with psycopg.connect(self.postgres_url) as connection:
                return connection.execute(sql.replace("?", "%s"), params).fetchone()[0]
        with sqlite3.connect(self.sqlite_path) as connection:
            return connection.execute(sql, params).fetchone()[0]

    def drop(self) -> None:
        if self.postgres_url:
            import psycopg

            with psycopg.connect(self.admin_url, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def service(tmp_path_factory, model_cache_dir):
    data_dir = tmp_path_factory.mktemp("e2e-data")
    database = Database(data_dir)
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        **database.env(),
        "SDXL_DATA_DIR": str(data_dir),
        "SDXL_MODEL_CACHE_DIR": str(model_cache_dir),
        "SDXL_MODEL_PRESET": "tiny",
        "SDXL_QUEUE_NAMESPACE": f"e2e-{uuid.uuid4().hex[:8]}",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = data_dir / "serve.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--web-workers",
            "1",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if requests.get(f"{base_url}/list_sessions", timeout=2).status_code == 200:
                break
        # Not up yet: refused, or accepted but the first request (imports, migrations
        # check) is still slow on a loaded machine.
        except (requests.ConnectionError, requests.Timeout):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"service did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.5)
    try:
        yield {
            "url": base_url,
            "data_dir": data_dir,
            "db": database,
            "log": log_path,
            "process": process,
        }
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
        database.drop()


def _post(service, path: str, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{service['url']}{path}", json=body, timeout=timeout)


def test_all_nine_endpoints(service, model_cache_dir):
    # No token configured: the start-up log says the open API is served on loopback only.
    assert "access: no API token configured" in service["log"].read_text(errors="replace")

    # create_session
    response = requests.get(f"{service['url']}/create_session", timeout=10)
    assert response.status_code == 200
    session_id = response.json()["session_id"]
    assert isinstance(session_id, int)
    sid = str(session_id)

    # post_session_image x3: PNG, JPEG, PNG; session_id as string and as int
    uploads = [("PNG", "red"), ("JPEG", "blue"), ("PNG", "green")]
    for index, (image_format, color) in enumerate(uploads):
        response = _post(
            service,
            "/post_session_image",
            {
                "session_id": sid if index % 2 == 0 else session_id,
                "image_base64": b64(image_bytes(image_format, (72, 64), color)),
                "prompt": f"a {color} square",
            },
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "success"}
    folder = service["data_dir"] / "session_data" / f"session_{session_id}"
    assert (folder / "1" / "0.jpg").exists() and (
        folder / "2" / "0.txt"
    ).read_text() == "a green square"

    # train_status before training
    assert _post(service, "/train_status", {"session_id": sid}).json() == {
        "status": "none",
        "progress": 0,
    }

    # train_lora, then poll train_status to completed; progress never goes backwards
    response = _post(service, "/train_lora", {"session_id": sid, "steps": 3, "resolution": 64})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "started"
    seen_progress = []
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        status = _post(service, "/train_status", {"session_id": sid}).json()
        assert status["status"] in {"in-progress", "completed"}, status
        seen_progress.append(status["progress"])
        if status["status"] == "completed":
            break
        assert time.monotonic() < deadline, service["log"].read_text(errors="replace")
        time.sleep(0.3)
    scores = {key: status.pop(key) for key in ("checkpoints", "best_checkpoint", "loss_history")}
    assert status == {
        "status": "completed",
        "progress": 100,
        "lora": "lora_1.safetensors",
        "samples": [],  # the original recipe (steps given) keeps none
        "resumed_from_step": None,
        "init_lora": None,
    }
    # No checkpoints: the final LoRA alone, scored, and so the best.
    [final] = scores["checkpoints"]
    assert final["lora_filename"] == "lora_1.safetensors" and final["eval_loss"] > 0
    assert scores["best_checkpoint"]["lora_filename"] == "lora_1.safetensors"
    assert scores["loss_history"][-1]["step"] == final["step"]
    assert seen_progress == sorted(seen_progress)

    # get_lora: decodes, and stock diffusers loads it
    response = _post(service, "/get_lora", {"session_id": sid})
    body = response.json()
    assert {k: body[k] for k in ("session_id", "lora_filename")} == {
        "session_id": sid,
        "lora_filename": "lora_1.safetensors",
    }
    lora_bytes = base64.b64decode(body["lora_base64"], validate=True)
    assert lora_bytes == (folder / "lora_1.safetensors").read_bytes()
    lora_file = service["data_dir"] / "downloaded.safetensors"
    lora_file.write_bytes(lora_bytes)
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(model_cache_dir / "tiny" / "base")
    pipeline.load_lora_weights(str(lora_file))
    assert any("lora" in name for name, _ in pipeline.unet.named_parameters())

    # upload_lora: without a filename it becomes lora_2; iteration 1 is still the first
    response = _post(service, "/upload_lora", {"session_id": sid, "lora_base64": b64(lora_bytes)})
    assert response.json()["status"] == "success"
    assert response.json()["lora_filename"] == "lora_2.safetensors"
    first = _post(service, "/get_lora", {"session_id": sid, "iteration": 1}).json()
    assert first["lora_filename"] == "lora_1.safetensors"
    missing = _post(service, "/get_lora", {"session_id": sid, "iteration": 9})
    assert missing.status_code == 404
    assert missing.json() == {"status": "error", "message": "Requested LoRA not found"}

    # list_sessions
    listed = requests.get(f"{service['url']}/list_sessions", timeout=10).json()["sessions"]
    assert {
        "session_id": sid,
        "latest_lora": "lora_2.safetensors",
        "image_groups": 3,
        "training": {**status, **scores},  # as /train_status answered it
    } in listed

    # txt2img with the session's latest LoRA: N PNGs of the asked size
    response = _post(
        service,
        "/txt2img",
        {
            "prompt": "a red square",
            "negative_prompt": "",
            "num_images": 2,
            "height": 80,
            "width": 64,
            "guidance_scale": 7.0,
            "steps": 6,
            "use_lora": True,
            "session_id": sid,
        },
    )
    assert response.status_code == 200, response.text
    images = response.json()["images_base64"]
    assert len(images) == 2
    for encoded in images:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert (image.format, image.size) == ("PNG", (64, 80))
    assert response.json()["lora"]["filename"] == "lora_2.safetensors"

    # delete_session: folder gone, rows gone
    response = _post(service, "/delete_session", {"session_id": sid})
    assert response.json() == {"status": "deleted", "session_id": sid}
    assert not folder.exists()
    db = service["db"]
    for table, column in [
        ("sessions_app_session", "id"),
        ("sessions_app_imagegroup", "session_id"),
        ("training_app_trainingrun", "session_id"),
        ("training_app_loraartifact", "session_id"),
    ]:
        assert db.count(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", session_id) == 0
    assert db.count("SELECT COUNT(*) FROM sessions_app_trainingimage") == 0
    assert sid not in [
        s["session_id"]
        for s in requests.get(f"{service['url']}/list_sessions", timeout=10).json()["sessions"]
    ]


def _trained(service, sid: str, body: dict) -> dict:
    """/train_lora with `body`, then /train_status polled until the run completes."""
    response = _post(service, "/train_lora", {"session_id": sid, **body})
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        status = _post(service, "/train_status", {"session_id": sid}).json()
        if status["status"] == "completed":
            return status
        assert status["status"] == "in-progress", status
        assert time.monotonic() < deadline, service["log"].read_text(errors="replace")
        time.sleep(0.3)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_likeness_masks_captions_scores_continuation_and_prior(service):
    """Issue 27's features through the API of the real service, as a user runs them: a
    given mask, a face mask, an automatic caption, a masked run with prior preservation
    scored on a held-out photo, then a continued run from the alpha channels."""
    from skimage import data

    url = service["url"]
    sid = str(requests.get(f"{url}/create_session", timeout=10).json()["session_id"])
    astronaut = Image.fromarray(data.astronaut()).resize((256, 256))
    square = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    square.paste((200, 30, 30, 255), (16, 16, 48, 48))  # opaque subject, transparent rest
    given_mask = Image.new("L", (64, 64), 0)
    given_mask.paste(255, (16, 16, 48, 48))
    uploads = [
        {"image_base64": b64(_png(astronaut)), "prompt": "auto"},
        {
            "image_base64": b64(_png(square)),
            "prompt": "sks, a red square",
            "mask_base64": b64(_png(given_mask)),
        },
        {"image_base64": b64(_png(square)), "prompt": "sks, a red square again"},
    ]
    for upload in uploads:
        response = _post(service, "/post_session_image", {"session_id": sid, **upload})
        assert response.status_code == 200, response.text
    detail = requests.get(f"{url}/sessions/{sid}", timeout=10).json()
    images = detail["images"]
    # "auto": the (tiny, random) captioning model wrote a caption; "auto" is never stored.
    assert images[0]["caption"] not in ("", "auto")
    assert [image["mask_url"] is None for image in images] == [True, False, True]

    # Face masks fill the images without one: the astronaut's face, nothing in a square.
    masks = _post(service, f"/sessions/{sid}/masks", {"kind": "face"}).json()
    assert [(item["image_id"], item["found"]) for item in masks["images"]] == [
        (images[0]["image_id"], True),
        (images[2]["image_id"], False),
    ]
    assert masks["skipped"] == 1  # the square's given mask stays
    mask_file = requests.get(f"{url}{masks['images'][0]['mask_url']}", timeout=10)
    face = Image.open(io.BytesIO(mask_file.content))
    assert face.size == (256, 256) and face.getpixel((112, 57)) == 255  # her face
    assert face.getpixel((5, 5)) == 0

    # A masked run that keeps the class, scored on one photo it never trains on.
    status = _trained(
        service,
        sid,
        {
            "trigger": "sks",
            "steps": 4,
            "resolution": 64,
            "checkpoint_every": 2,
            "masked_loss": True,
            "prior_preservation_weight": 0.5,
            "class_prompt": "a red square",
            "eval_holdout": 1,
        },
    )
    assert [entry["step"] for entry in status["checkpoints"]] == [2, 4]
    assert all(entry["eval_loss"] > 0 for entry in status["checkpoints"])
    best = min(status["checkpoints"], key=lambda entry: (entry["eval_loss"], entry["step"]))
    assert status["best_checkpoint"]["lora_filename"] == best["lora_filename"]
    assert [point["step"] for point in status["loss_history"]] == [1, 2, 3, 4]
    parent_sha256 = requests.get(f"{url}/sessions/{sid}", timeout=10).json()["loras"][0]["sha256"]

    # Continue that LoRA, masks from the images' alpha this time.
    status = _trained(
        service,
        sid,
        {
            "trigger": "sks",
            "steps": 2,
            "resolution": 64,
            "init_lora": {"iteration": 1},
            "use_alpha_mask": True,
        },
    )
    assert status["lora"] == "lora_2.safetensors"
    download = requests.get(f"{url}/sessions/{sid}/loras/lora_2.safetensors", timeout=30)
    header = _safetensors_metadata(download.content)
    assert header["sdxl_service.parent_sha256"] == parent_sha256
    assert header["sdxl_service.total_steps_cumulative"] == "6"
    assert header["sdxl_service.use_alpha_mask"] == "True"


def _safetensors_metadata(data: bytes) -> dict:
    """The safetensors header's metadata of a file's bytes."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])["__metadata__"]


def test_ctrl_c_stops_server_and_workers(service):
    process = service["process"]
    tree = process_tree(process.pid)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    # No process serve started (each runs in a group of its own) outlives it.
    assert still_running(tree) == []
