import pytest
from django.urls import reverse

from sessions_app import services, storage
from sessions_app.models import Session, TrainingImage
from tests.helpers import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def session_with_image():
    session = services.session_create()
    services.session_image_add(session.pk, image_bytes("JPEG"), "a blue square")
    return session


def test_session_page_shows_groups_with_thumbnail_and_caption(admin_client, session_with_image):
    response = admin_client.get(
        reverse("admin:sessions_app_session_change", args=[session_with_image.pk])
    )
    assert response.status_code == 200
    image = TrainingImage.objects.get()
    content = response.content.decode()
    assert reverse("admin:sessions_app_trainingimage_file", args=[image.pk]) in content
    assert "a blue square" in content


def test_image_file_is_served_to_staff_only(admin_client, client, session_with_image):
    image = TrainingImage.objects.get()
    url = reverse("admin:sessions_app_trainingimage_file", args=[image.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == storage.absolute_path(image.file).read_bytes()
    assert client.get(url).status_code == 302  # to the admin login


def test_changelists_render(admin_client, session_with_image):
    for name in ["sessions_app_session", "sessions_app_trainingimage"]:
        assert admin_client.get(reverse(f"admin:{name}_changelist")).status_code == 200


def test_deleting_a_session_in_the_admin_removes_its_folder(
    admin_client, session_with_image, django_capture_on_commit_callbacks
):
    folder = storage.session_dir(session_with_image.pk)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:sessions_app_session_delete", args=[session_with_image.pk]),
            {"post": "yes"},
        )
    assert response.status_code == 302
    assert not Session.objects.exists() and not folder.exists()
