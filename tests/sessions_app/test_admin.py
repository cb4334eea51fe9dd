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


def _change_form_data(response) -> dict:
    """What the browser would post back from the change form, unchanged."""
    data = {}
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for name in formset.management_form.fields:
            data[f"{formset.prefix}-{name}"] = formset.management_form[name].value()
        for form in formset.forms:
            for name in form.fields:
                value = form[name].value()
                if value is not None:
                    data[form.add_prefix(name)] = value
    return data


def _caption_field(data: dict) -> str:
    (name,) = [key for key in data if key.endswith("-caption")]
    return name


def test_session_page_edits_a_caption_inline_and_rewrites_its_file(
    admin_client, session_with_image
):
    url = reverse("admin:sessions_app_session_change", args=[session_with_image.pk])
    page = admin_client.get(url)
    image = TrainingImage.objects.get()
    thumbnail = reverse("admin:sessions_app_trainingimage_file", args=[image.pk])
    content = page.content.decode()
    assert f'<img src="{thumbnail}"' in content
    assert "<textarea" in content and "a blue square</textarea>" in content
    data = _change_form_data(page)
    data[_caption_field(data)] = "  ohwx, a blue square\n"

    response = admin_client.post(url, data)

    assert response.status_code == 302, response.context and response.context["errors"]
    caption_file = storage.absolute_path(image.file).with_suffix(".txt")
    assert caption_file.read_text() == "ohwx, a blue square"
    assert TrainingImage.objects.get().caption == "ohwx, a blue square"
    assert Session.objects.get().next_group_number == 1


def test_session_page_refuses_a_caption_edit_while_the_session_trains(
    admin_client, session_with_image
):
    from training_app.models import TrainingRun

    url = reverse("admin:sessions_app_session_change", args=[session_with_image.pk])
    data = _change_form_data(admin_client.get(url))
    run = TrainingRun.objects.create(session=session_with_image, status="running", parameters={})
    data[_caption_field(data)] = "changed while training"

    response = admin_client.post(url, data)

    assert response.status_code == 200  # the form again, with the error
    assert f"is training (run {run.pk})" in response.content.decode()
    image = TrainingImage.objects.get()
    assert image.caption == "a blue square"
    assert storage.absolute_path(image.file).with_suffix(".txt").read_text() == "a blue square"


def test_a_mask_is_shown_beside_its_image_and_served_to_staff_only(
    admin_client, client, session_with_image
):
    image = TrainingImage.objects.get()
    mask_url = reverse("admin:sessions_app_trainingimage_mask", args=[image.pk])
    image_url = reverse("admin:sessions_app_trainingimage_file", args=[image.pk])
    session_page = reverse("admin:sessions_app_session_change", args=[session_with_image.pk])
    assert mask_url not in admin_client.get(session_page).content.decode()
    assert admin_client.get(mask_url).status_code == 404
    services.session_image_add(
        session_with_image.pk, image_bytes(), "masked", mask_bytes=image_bytes(color="white")
    )
    masked = TrainingImage.objects.get(caption="masked")
    mask_url = reverse("admin:sessions_app_trainingimage_mask", args=[masked.pk])

    content = admin_client.get(session_page).content.decode()
    detail = admin_client.get(
        reverse("admin:sessions_app_trainingimage_change", args=[masked.pk])
    ).content.decode()
    changelist = admin_client.get(reverse("admin:sessions_app_trainingimage_changelist"))

    assert f'<img src="{image_url}"' in content and f'<img src="{mask_url}"' in content
    assert f'<img src="{mask_url}"' in detail and masked.mask_file in detail
    assert "column-has_mask" in changelist.content.decode()
    response = admin_client.get(mask_url)
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    mask_path = storage.absolute_path(masked.mask_file)
    assert b"".join(response.streaming_content) == mask_path.read_bytes()
    assert client.get(mask_url).status_code == 302  # to the admin login
