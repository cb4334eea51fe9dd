"""export_session → import_session of a session that trained: its runs (parameters, history,
statuses), their checkpoints and sample images (files and rows) travel with it, so the
imported session answers /train_status, /get_lora of a checkpoint and the sample URLs as
the exported one did, and `verify` is clean straight after the import. Archives written
before runs travelled (version 1) still import."""

import base64
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from datadir_app.archive import UNFINISHED_MESSAGE, session_export
from sessions_app import services, storage
from sessions_app.models import Session
from tests.helpers import image_bytes
from tests.maintenance_helpers import run, stored_checkpoint, stored_samples
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services import runs as run_services
from training_app.services.watch import checkpoint_path, sample_path

pytestmark = pytest.mark.django_db

# Two steps that keep a sample of each step and a checkpoint at step 1 (the tiny model).
WATCHED = {
    "steps": 2,
    "resolution": 64,
    "batch_size": 1,
    "seed": 1,
    "sample_every": 1,
    "checkpoint_every": 1,
}
FIXTURES = Path(__file__).parent / "fixtures"
_RUN_FIELDS = (
    "status",
    "stage",
    "progress",
    "step",
    "total_steps",
    "last_loss",
    "parameters",
    "error_message",
    "created_at",
    "started_at",
    "finished_at",
    "training_started_at",
    "attempts",
    "resumed_from_step",
    "webhook_url",
    "webhook_events",
)


@pytest.fixture
def trained(training_worker):
    """A session with two images, a run cancelled while queued and a completed run that
    kept checkpoints and samples, trained on the tiny model as the worker does."""
    session = services.session_create()
    for color in ("red", "blue"):
        services.session_image_add(session.pk, image_bytes(color=color), f"a {color} square")
    run_services.training_run_start(session.pk, WATCHED)
    run_services.training_run_cancel(session.pk)
    completed = run_services.training_run_start(session.pk, WATCHED)
    run_services.training_run_execute(completed.pk)
    completed.refresh_from_db()
    assert completed.status == "completed"
    assert completed.checkpoints.exists() and completed.samples.exists()
    session.refresh_from_db()
    return session


def _runs(session_id: int) -> list[tuple]:
    return list(
        TrainingRun.objects.filter(session_id=session_id).order_by("pk").values_list(*_RUN_FIELDS)
    )


def _kept(session_id: int) -> tuple:
    """The session's checkpoints and samples, each with its file's bytes, by run in order."""
    runs = list(TrainingRun.objects.filter(session_id=session_id).order_by("pk"))
    checkpoints = [
        (runs.index(c.run), c.step, c.size, c.sha256, c.metadata, checkpoint_path(c).read_bytes())
        for c in TrainingCheckpoint.objects.filter(session_id=session_id).order_by("run", "step")
    ]
    samples = [
        (runs.index(s.run), s.step, s.index, s.prompt, s.filename, sample_path(s).read_bytes())
        for s in TrainingSample.objects.filter(run__session_id=session_id).order_by(
            "run", "step", "index"
        )
    ]
    loras = [
        (lora.filename, lora.number, runs.index(lora.training_run) if lora.training_run else None)
        for lora in LoraArtifact.objects.filter(session_id=session_id).order_by("number")
    ]
    return checkpoints, samples, loras


def _api(path: str, body: dict) -> dict:
    response = APIClient().post(path, body, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _png(url: str) -> bytes:
    response = APIClient().get(url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    return b"".join(response.streaming_content)


def test_export_import_keeps_runs_checkpoints_and_samples(trained, tmp_path):
    archive = tmp_path / "session.zip"
    run("export_session", str(trained.pk), str(archive))

    output = run("import_session", str(archive))

    copy = Session.objects.exclude(pk=trained.pk).get()
    assert f"as session {copy.pk}" in output
    assert _runs(copy.pk) == _runs(trained.pk)
    assert _kept(copy.pk) == _kept(trained.pk)
    # Its run's files are named after the run they now belong to.
    for checkpoint in TrainingCheckpoint.objects.filter(session=copy):
        assert (
            checkpoint.filename == f"lora_run{checkpoint.run_id}_step{checkpoint.step}.safetensors"
        )
    # Through the API: the training status, the checkpoint's LoRA and the sample images.
    original = _api("/train_status", {"session_id": str(trained.pk)})
    status = _api("/train_status", {"session_id": str(copy.pk)})
    assert status["status"] == "completed" and status["lora"] == original["lora"]
    # With their scores and the loss history.
    assert [(c["step"], c["eval_loss"]) for c in status["checkpoints"]] == [
        (c["step"], c["eval_loss"]) for c in original["checkpoints"]
    ]
    assert status["loss_history"] == original["loss_history"] != []
    assert [(s["step"], s["prompt"]) for s in status["samples"]] == [
        (s["step"], s["prompt"]) for s in original["samples"]
    ]
    for mine, theirs in zip(status["samples"], original["samples"], strict=True):
        assert _png(mine["url"]) == _png(theirs["url"])
    checkpoint = status["checkpoints"][0]["lora_filename"]
    lora = _api("/get_lora", {"session_id": str(copy.pk), "lora_filename": checkpoint})
    assert lora["lora_filename"] == checkpoint and lora["iteration"] is None
    written = storage.session_dir(copy.pk) / "checkpoints" / checkpoint
    assert base64.b64decode(lora["lora_base64"]) == written.read_bytes()
    detail = APIClient().get(f"/sessions/{copy.pk}").json()
    assert [(r["status"], r["message"], r["parameters"]) for r in detail["runs"]] == [
        (r["status"], r["message"], r["parameters"])
        for r in APIClient().get(f"/sessions/{trained.pk}").json()["runs"]
    ]
    verified = run("verify")
    assert "the rows and files agree" in verified and "note" not in verified
    # And an export of the copy describes the same session.
    again = session_export(copy.pk, tmp_path / "again.zip")
    first = json.loads(zipfile.ZipFile(archive).read("session.json"))
    assert len(again["runs"]) == len(first["runs"]) == 2


def test_an_imported_session_trains_again_beside_its_imported_runs(trained, tmp_path):
    archive = tmp_path / "session.zip"
    session_export(trained.pk, archive)
    run("import_session", str(archive))
    copy = Session.objects.exclude(pk=trained.pk).get()

    started = _api("/train_lora", {"session_id": str(copy.pk), **WATCHED})
    run_services.training_run_execute(started["run_id"])

    assert _api("/train_status", {"session_id": str(copy.pk)})["lora"] == "lora_2.safetensors"
    assert TrainingCheckpoint.objects.filter(session=copy).count() == 2
    assert "the rows and files agree" in run("verify")


def test_an_archive_written_before_runs_travelled_still_imports(tmp_path):
    """tests/datadir_app/fixtures/session_v1.zip: a trained session as export_session
    wrote it before version 2 (images, LoRA, checkpoint and sample files; no run rows)."""
    output = run("import_session", str(FIXTURES / "session_v1.zip"))

    session = Session.objects.get()
    assert f"as session {session.pk}" in output
    manifest = json.loads(zipfile.ZipFile(FIXTURES / "session_v1.zip").read("session.json"))
    assert manifest["version"] == 1
    assert list(LoraArtifact.objects.values_list("filename", "sha256")) == [
        (lora["filename"], lora["sha256"]) for lora in manifest["loras"]
    ]
    folder = storage.session_dir(session.pk)
    for name, sha256 in manifest["files"].items():
        assert storage.sha256_bytes((folder / name).read_bytes()) == sha256
    assert "the rows and files agree" in run("verify")


def test_a_run_still_running_when_exported_is_imported_as_ended(tmp_path):
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "a red square")
    running = TrainingRun.objects.create(session=session, status="running", stage="training")
    stored_checkpoint(running, 2, seed=2)
    stored_samples(running, 2, prompts=("a red square", "a cat"))
    archive = tmp_path / "session.zip"
    output = run("export_session", str(session.pk), str(archive))
    assert "1 training runs, 1 checkpoints, 2 sample images" in output

    run("import_session", str(archive))

    copy = TrainingRun.objects.exclude(pk=running.pk).get()
    assert (copy.status, copy.error_message) == ("error", UNFINISHED_MESSAGE)
    assert TrainingRun.objects.get(pk=running.pk).status == "running"  # the original's own
    assert _kept(copy.session_id) == _kept(session.pk)
    assert _api("/train_status", {"session_id": str(copy.session_id)}) == {
        "status": "error",
        "message": UNFINISHED_MESSAGE,
    }
    verified = run("verify")
    assert "the rows and files agree" in verified and "note" not in verified


def test_an_archive_whose_runs_contradict_themselves_leaves_nothing(tmp_path):
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "a red square")
    ended = TrainingRun.objects.create(session=session, status="completed")
    stored_checkpoint(ended, 2, seed=2)
    archive = tmp_path / "session.zip"
    manifest = session_export(session.pk, archive)
    manifest["runs"][0]["checkpoints"][0]["filename"] = "../lora_1.safetensors"
    crafted = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive) as original, zipfile.ZipFile(crafted, "w") as copy:
        for info in original.infolist():
            if info.filename != "session.json":
                copy.writestr(info, original.read(info))
        copy.writestr("session.json", json.dumps(manifest))

    with pytest.raises(CommandError, match="does not match the file"):
        run("import_session", str(crafted))

    assert list(Session.objects.values_list("pk", flat=True)) == [session.pk]
    assert TrainingRun.objects.count() == 1 and TrainingCheckpoint.objects.count() == 1
    assert [
        p.name
        for p in storage.session_dir(session.pk).parent.iterdir()
        if not p.name.startswith(".")
    ] == [f"session_{session.pk}"]


def test_a_run_that_continued_a_checkpoint_names_it_as_the_import_renames_it(tmp_path):
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes(), "a red square")
    parent_run = TrainingRun.objects.create(session=session, status="completed", stage="done")
    checkpoint = stored_checkpoint(parent_run, 1, seed=1)
    continued = {
        "lora_filename": checkpoint.filename,
        "iteration": None,
        "sha256": checkpoint.sha256,
    }
    TrainingRun.objects.create(session=session, status="completed", init_lora=continued)
    archive = tmp_path / "session.zip"
    session_export(session.pk, archive)

    run("import_session", str(archive))

    copy = Session.objects.exclude(pk=session.pk).get()
    parent_copy, continued_copy = TrainingRun.objects.filter(session=copy).order_by("pk")
    assert continued_copy.init_lora == {
        **continued,
        "lora_filename": f"lora_run{parent_copy.pk}_step1.safetensors",
    }
