"""A session's admin page that acts: start and cancel training, download LoRAs in either
form, see runs, samples and generations; search on sessions, LoRAs and runs."""

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.urls import reverse
from safetensors.torch import load as load_safetensors

from sdxl_service.admin import NOT_IN_THE_FORM, training_form_fields
from sdxl_service.api.training.serializers import TrainLoraSerializer
from sessions_app import services as session_services
from sessions_app import storage
from tests.helpers import image_bytes
from tests.maintenance_helpers import stored_samples
from training_app.models import Generation, LoraArtifact, TrainingRun
from training_app.services import runs as run_services

pytestmark = pytest.mark.django_db


@pytest.fixture
def session():
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    return session


def page_url(session) -> str:
    return reverse("admin:sessions_app_session_change", args=[session.pk])


def start_url(session) -> str:
    return reverse("admin:sessions_app_session_start_training", args=[session.pk])


def cancel_url(session) -> str:
    return reverse("admin:sessions_app_session_cancel_training", args=[session.pk])


def texts(response) -> list[str]:
    """The messages stored so far (the test client keeps them until a page shows them)."""
    return [str(message) for message in get_messages(response.wsgi_request)]


def test_the_form_has_every_training_parameter_of_the_api(admin_client, session):
    api_fields = set(TrainLoraSerializer().fields) - set(NOT_IN_THE_FORM)
    assert set(training_form_fields()) == api_fields
    content = admin_client.get(page_url(session)).content.decode()
    assert f'action="{start_url(session)}"' in content
    assert "csrfmiddlewaretoken" in content
    for name in api_fields:
        assert f'name="{name}"' in content, name


def test_start_training_queues_a_run_with_the_parameters(admin_client, session):
    response = admin_client.post(
        start_url(session),
        {
            "recipe": "",  # empty: left to the recipe, as a field left out of /train_lora
            "steps": "3",
            "rank": "8",
            "learning_rate": "2e-4",
            "resolution": "64",
            "trigger": "sks",
            "enable_bucket": "false",
            "sample_prompts": "a red square\n\n  sks on a beach \n",
        },
    )

    assert response.status_code == 302 and response["Location"] == page_url(session)
    run = TrainingRun.objects.get()
    assert run.session_id == session.pk and run.status == "queued"
    parameters = run.parameters
    assert parameters["steps"] == 3 and parameters["rank"] == 8
    assert parameters["learning_rate"] == 2e-4 and parameters["resolution"] == 64
    assert parameters["trigger"] == "sks" and parameters["enable_bucket"] is False
    assert parameters["sample_prompts"] == ["a red square", "sks on a beach"]
    [message] = texts(response)
    assert f">{run.pk}</a> queued: 3 steps, rank 8." in message
    # The same body through the API records the same recipe.
    run_services.training_run_cancel(session.pk)
    api_response = admin_client.post(
        "/train_lora",
        {
            "session_id": session.pk,
            "steps": 3,
            "rank": 8,
            "learning_rate": 2e-4,
            "resolution": 64,
            "trigger": "sks",
            "enable_bucket": False,
            "sample_prompts": ["a red square", "sks on a beach"],
        },
        content_type="application/json",
    )
    assert api_response.status_code == 200, api_response.content
    assert TrainingRun.objects.get(pk=api_response.json()["run_id"]).parameters == parameters

    # While it runs, the page offers to cancel instead.
    content = admin_client.get(page_url(session)).content.decode()
    assert f'action="{cancel_url(session)}"' in content
    assert f'action="{start_url(session)}"' not in content


@pytest.mark.parametrize(
    "body, error",
    [
        ({"rank": "0"}, "rank: Ensure this value is greater than or equal to 1."),
        ({"learning_rate": "fast"}, "learning_rate: A valid number is required."),
        ({"steps": "2", "epochs": "1"}, "give steps or epochs, not both"),
        ({"steps": "2.5"}, "steps: A valid integer is required."),
        ({"resolution": "100"}, "resolution: must be a multiple of 64"),
        (
            {"recipe": "fastest"},
            'recipe: "fastest" is not a valid choice; must be one of: service,',
        ),
        ({"text_encoder_lr": "1e-5"}, "text_encoder_lr: needs train_text_encoder true"),
    ],
)
def test_invalid_parameters_are_messages_and_start_nothing(admin_client, session, body, error):
    response = admin_client.post(start_url(session), body)

    assert response.status_code == 302 and response["Location"] == page_url(session)
    assert not TrainingRun.objects.exists()
    assert any(error in message for message in texts(response)), texts(response)
    assert all(message.startswith("Training not started: ") for message in texts(response))


def test_service_refusals_are_messages(admin_client):
    empty = session_services.session_create()
    response = admin_client.post(start_url(empty), {"steps": "1"})
    assert "has no images with captions" in texts(response)[0]
    assert not TrainingRun.objects.exists()


def test_a_second_start_while_training_is_refused(admin_client, session):
    admin_client.post(start_url(session), {"steps": "1"})
    response = admin_client.post(start_url(session), {"steps": "1"})
    assert texts(response)[-1] == f"Training not started: session {session.pk} is already training"
    assert TrainingRun.objects.count() == 1


def test_cancel_the_queued_run(admin_client, session):
    run = run_services.training_run_start(session.pk, {"steps": 1})

    response = admin_client.post(cancel_url(session))

    assert response.status_code == 302 and response["Location"] == page_url(session)
    run.refresh_from_db()
    assert run.status == "cancelled" and run.error_message == "training was cancelled"
    assert texts(response) == [f"Training run {run.pk} cancelled."]
    # Nothing left to cancel: said so, nothing changes.
    again = admin_client.post(cancel_url(session))
    assert texts(again)[-1] == f"session {session.pk} has no queued or running training"


def test_actions_need_post_csrf_and_change_permission(admin_client, client, session):
    assert admin_client.get(start_url(session)).status_code == 405
    assert admin_client.get(cancel_url(session)).status_code == 405
    # Anonymous: to the login page.
    assert client.post(start_url(session), {"steps": "1"}).status_code == 302
    # Staff who may only view sessions: no forms, and the actions are refused.
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_session", content_type__app_label="sessions_app")
    )
    client.force_login(viewer)
    page = client.get(page_url(session))
    assert page.status_code == 200 and "start-training" not in page.content.decode()
    assert client.post(start_url(session), {"steps": "1"}).status_code == 403
    assert client.post(cancel_url(session)).status_code == 403
    assert not TrainingRun.objects.exists()
    # A POST without the CSRF token is refused.
    admin = User.objects.create_superuser("boss", password="pw")
    checked = type(client)(enforce_csrf_checks=True)
    checked.force_login(admin)
    assert checked.post(start_url(session), {"steps": "1"}).status_code == 403
    assert not TrainingRun.objects.exists()


@pytest.fixture
def trained(session):
    run = run_services.training_run_start(session.pk, {"steps": 1, "resolution": 64})
    run_services.training_run_execute(run.pk)
    return LoraArtifact.objects.get()


def test_lora_downloads_in_both_forms(admin_client, client, trained):
    diffusers_url = reverse(
        "admin:training_app_loraartifact_download_as", args=[trained.pk, "diffusers"]
    )
    kohya_url = reverse("admin:training_app_loraartifact_download_as", args=[trained.pk, "kohya"])

    page = admin_client.get(page_url(trained.session)).content.decode()
    assert diffusers_url in page and kohya_url in page
    assert trained.filename in page and trained.sha256 in page

    diffusers = admin_client.get(diffusers_url)
    assert diffusers.status_code == 200
    assert 'filename="lora_1.safetensors"' in diffusers["Content-Disposition"]
    path = storage.session_dir(trained.session_id) / trained.filename
    assert diffusers.content == path.read_bytes()

    kohya = admin_client.get(kohya_url)
    assert kohya.status_code == 200
    assert 'filename="lora_1.kohya.safetensors"' in kohya["Content-Disposition"]
    keys = list(load_safetensors(kohya.content))
    assert keys and all(key.startswith("lora_unet_") for key in keys)

    assert (
        admin_client.get(
            reverse("admin:training_app_loraartifact_download_as", args=[trained.pk, "ckpt"])
        ).status_code
        == 404
    )
    assert client.get(kohya_url).status_code == 302  # to the login page


def test_session_page_shows_runs_samples_and_generations(admin_client, session):
    run = TrainingRun.objects.create(
        session=session, status="error", error_message="out of memory", step=3, total_steps=10
    )
    samples = stored_samples(run, 2, prompts=("a red square", "a <b>bold</b> cat"))
    generation = Generation.objects.create(
        prompt="a lighthouse at dusk", seed=7, session=session, status="completed"
    )

    content = admin_client.get(page_url(session)).content.decode()

    assert reverse("admin:training_app_trainingrun_change", args=[run.pk]) in content
    assert "out of memory" in content and "3 / 10" in content
    for sample in samples:
        url = reverse("admin:training_app_trainingrun_sample", args=[run.pk, sample.pk])
        assert f'<a href="{url}"><img src="{url}"' in content
    assert "a &lt;b&gt;bold&lt;/b&gt; cat" in content and "<b>bold</b>" not in content
    assert reverse("admin:training_app_generation_change", args=[generation.pk]) in content
    assert "a lighthouse at dusk" in content


def changelist_rows(admin_client, model: str, query: str) -> str:
    response = admin_client.get(reverse(f"admin:{model}_changelist"), {"q": query})
    assert response.status_code == 200
    return response.content.decode()


def test_search(admin_client, session):
    other = session_services.session_create()
    session_services.session_image_add(other.pk, image_bytes(), "a blue lighthouse")
    found = changelist_rows(admin_client, "sessions_app_session", "lighthouse")
    assert f"session_{other.pk}<" in found and f"session_{session.pk}<" not in found
    by_id = changelist_rows(admin_client, "sessions_app_session", str(session.pk))
    assert f"session_{session.pk}<" in by_id and f"session_{other.pk}<" not in by_id

    failed = TrainingRun.objects.create(
        session=session, status="error", error_message="CUDA out of memory"
    )
    done = TrainingRun.objects.create(session=other, status="completed")
    run_rows = (
        ("out of memory", failed, done),
        ("completed", done, failed),
        (str(other.pk), done, failed),
    )
    for query, hit, miss in run_rows:
        rows = changelist_rows(admin_client, "training_app_trainingrun", query)
        assert f"run {hit.pk} of" in rows and f"run {miss.pk} of" not in rows, query

    first = LoraArtifact.objects.create(
        session=session, number=1, filename="portrait.safetensors", size=1, sha256="ab" * 32
    )
    second = LoraArtifact.objects.create(
        session=other, number=1, filename="lora_1.safetensors", size=1, sha256="cd" * 32
    )
    for query, hit, miss in (("portrait", first, second), ("cdcdcd", second, first)):
        rows = changelist_rows(admin_client, "training_app_loraartifact", query)
        assert str(hit) in rows and str(miss) not in rows, query
