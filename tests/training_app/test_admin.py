import pytest
from django.urls import reverse

from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes
from training_app.models import LoraArtifact, TrainingRun
from training_app.services import runs as run_services

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
