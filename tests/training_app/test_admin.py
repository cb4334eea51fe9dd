import io
import re

import pytest
from django.urls import reverse
from PIL import Image

from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes
from tests.maintenance_helpers import stored_checkpoint, stored_samples
from training_app.models import LoraArtifact, TrainingCheckpoint, TrainingRun, TrainingSample
from training_app.services import runs as run_services
from training_app.services.watch import checkpoint_path, sample_path

pytestmark = pytest.mark.django_db


@pytest.fixture
def trained():
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    return LoraArtifact.objects.get()


def test_lora_download(admin_client, trained):
    response = admin_client.get(
        reverse("admin:training_app_loraartifact_download", args=[trained.pk])
    )
    assert response.status_code == 200
    assert "lora_1.safetensors" in response["Content-Disposition"]
    path = storage.session_dir(trained.session_id) / trained.filename
    assert b"".join(response.streaming_content) == path.read_bytes()


def test_pages_render(admin_client, trained):
    run = TrainingRun.objects.get()
    pages = [
        reverse("admin:training_app_loraartifact_changelist"),
        reverse("admin:training_app_loraartifact_change", args=[trained.pk]),
        reverse("admin:training_app_trainingrun_changelist"),
        reverse("admin:training_app_trainingrun_change", args=[run.pk]),
        reverse("admin:training_app_generation_changelist"),
        reverse("admin:training_app_workerheartbeat_changelist"),
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
    detail = admin_client.get(reverse("admin:training_app_loraartifact_change", args=[trained.pk]))
    assert trained.sha256 in detail.content.decode()


@pytest.fixture
def watched_run():
    """A run that rendered sample images at each of its two steps and saved a checkpoint at
    step 1 (step 2's file is the run's LoRA)."""
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    run = run_services.training_run_start(
        session.pk,
        {
            "steps": 2,
            "resolution": 64,
            "sample_every": 1,
            "checkpoint_every": 1,
            "sample_prompts": ["a red square", "a <b>bold</b> cat"],
        },
    )
    run_services.training_run_execute(run.pk)
    run.refresh_from_db()
    assert run.status == "completed"
    return run


def test_run_page_shows_its_samples_and_checkpoints(admin_client, watched_run):
    page = admin_client.get(reverse("admin:training_app_trainingrun_change", args=[watched_run.pk]))
    assert page.status_code == 200
    content = page.content.decode()
    samples = list(TrainingSample.objects.filter(run=watched_run))
    assert [(s.step, s.index) for s in samples] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for sample in samples:
        url = reverse("admin:training_app_trainingrun_sample", args=[watched_run.pk, sample.pk])
        assert f'<a href="{url}"><img src="{url}"' in content
        assert f"step {sample.step}: " in content
    assert "a &lt;b&gt;bold&lt;/b&gt; cat" in content and "<b>bold</b>" not in content
    checkpoints = list(TrainingCheckpoint.objects.filter(run=watched_run))
    assert [c.step for c in checkpoints] == [1]  # the last step's file is the run's LoRA
    for checkpoint in checkpoints:
        assert checkpoint.filename in content
        download = reverse("admin:training_app_trainingcheckpoint_download", args=[checkpoint.pk])
        assert download in content
    assert "Attempts" in content and "Resumed from step" in content
    # The curves, drawn on the server: the training loss of both steps, the eval loss at
    # step 0, the checkpoint and the end, the (tiny embedder's) similarity at both.
    [svg] = re.findall(r'<svg [^>]*aria-label="loss curves".*?</svg>', content, re.S)
    # By name: two curves may run through the very same pixels (each axis is its own).
    curves = {
        name: line
        for line, name in re.findall(r'<polyline points="([^"]*)"[^>]*><title>([^<]*)<', svg)
    }
    assert sorted(curves) == ["eval loss", "similarity", "training loss"]
    points = {name: len(line.split()) for name, line in curves.items()}
    assert points == {"training loss": 2, "eval loss": 3, "similarity": 2}
    assert "<script" not in svg
    # Each step's samples under the step and its scores.
    checkpoint = checkpoints[0]
    assert f"<strong>step 1</strong> (eval loss {checkpoint.eval_loss:.4g}, similarity" in content
    assert f"<strong>step 2</strong> (eval loss {watched_run.eval_loss:.4g}, similarity" in content

    changelist = admin_client.get(reverse("admin:training_app_trainingrun_changelist"))
    assert changelist.status_code == 200
    assert "column-attempts" in changelist.content.decode()
    assert "column-resumed_from_step" in changelist.content.decode()


def test_sample_image_is_served_as_png_to_staff_only(admin_client, client, watched_run):
    sample = TrainingSample.objects.filter(run=watched_run).last()
    url = reverse("admin:training_app_trainingrun_sample", args=[watched_run.pk, sample.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    body = b"".join(response.streaming_content)
    assert body == sample_path(sample).read_bytes()
    assert Image.open(io.BytesIO(body)).format == "PNG"
    assert client.get(url).status_code == 302  # to the admin login
    # A sample is only served under its own run, and a missing file is a 404.
    other = reverse("admin:training_app_trainingrun_sample", args=[watched_run.pk + 1, sample.pk])
    assert admin_client.get(other).status_code == 404
    sample_path(sample).unlink()
    assert admin_client.get(url).status_code == 404


def test_checkpoint_download_and_pages(admin_client, client, watched_run):
    checkpoint = TrainingCheckpoint.objects.get(run=watched_run, step=1)
    url = reverse("admin:training_app_trainingcheckpoint_download", args=[checkpoint.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    assert f"lora_run{watched_run.pk}_step1.safetensors" in response["Content-Disposition"]
    body = b"".join(response.streaming_content)
    assert body == checkpoint_path(checkpoint).read_bytes()
    assert storage.sha256_bytes(body) == checkpoint.sha256
    assert client.get(url).status_code == 302
    for page in (
        reverse("admin:training_app_trainingcheckpoint_changelist"),
        reverse("admin:training_app_trainingcheckpoint_change", args=[checkpoint.pk]),
    ):
        rendered = admin_client.get(page)
        assert rendered.status_code == 200, page
        assert url in rendered.content.decode()
    # Read-only: rows mirror files.
    delete = reverse("admin:training_app_trainingcheckpoint_delete", args=[checkpoint.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert TrainingCheckpoint.objects.filter(pk=checkpoint.pk).exists()
    checkpoint_path(checkpoint).unlink()
    assert admin_client.get(url).status_code == 404


def test_checkpoints_leave_only_with_their_session(
    admin_client, django_capture_on_commit_callbacks
):
    session = session_services.session_create()
    run = TrainingRun.objects.create(session=session, status="completed")
    checkpoint = stored_checkpoint(run, 2)
    stored_samples(run, 2)

    # A run's row cannot be deleted from under its checkpoint files...
    response = admin_client.post(
        reverse("admin:training_app_trainingrun_delete", args=[run.pk]), {"post": "yes"}
    )
    assert response.status_code == 403
    assert TrainingCheckpoint.objects.filter(pk=checkpoint.pk).exists()

    # ...but the session goes whole, rows and folder.
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:sessions_app_session_delete", args=[session.pk]), {"post": "yes"}
        )
    assert response.status_code == 302
    assert not TrainingRun.objects.exists() and not TrainingCheckpoint.objects.exists()
    assert not TrainingSample.objects.exists()
    assert not storage.session_dir(session.pk).exists()
