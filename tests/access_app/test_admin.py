import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from access_app.models import ApiToken, Owner
from access_app.selectors import api_token_caller

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return Owner.objects.create(name="team a")


def test_creating_a_token_shows_its_plaintext_once(admin_client, owner):
    response = admin_client.post(
        reverse("admin:access_app_apitoken_add"),
        {"name": "render farm", "owner": owner.pk, "scopes": ["read", "generate"]},
        follow=True,
    )
    assert response.status_code == 200
    token = ApiToken.objects.get()
    (shown,) = [str(m) for m in get_messages(response.wsgi_request) if "Copy it now" in str(m)]
    plaintext = shown.split("<code>")[1].split("</code>")[0]
    caller = api_token_caller(plaintext)
    assert caller.name == "API token 'render farm'"
    assert (caller.owner_id, caller.scopes) == (owner.pk, {"read", "generate"})
    assert token.sha256 != plaintext and plaintext.startswith(token.prefix)

    change_page = admin_client.get(reverse("admin:access_app_apitoken_change", args=[token.pk]))
    assert plaintext not in change_page.content.decode()
    assert token.prefix in change_page.content.decode()


def test_renaming_a_token_keeps_its_secret(admin_client, owner):
    admin_client.post(
        reverse("admin:access_app_apitoken_add"),
        {"name": "old", "owner": owner.pk, "scopes": ["read"]},
    )
    token = ApiToken.objects.get()
    admin_client.post(
        reverse("admin:access_app_apitoken_change", args=[token.pk]),
        {"name": "new", "owner": owner.pk, "scopes": ["read", "delete"]},
    )
    renamed = ApiToken.objects.get()
    assert (renamed.name, renamed.sha256) == ("new", token.sha256)
    assert renamed.scopes == ["read", "delete"]


def test_token_list_is_staff_only(client):
    response = client.get(reverse("admin:access_app_apitoken_changelist"))
    assert response.status_code == 302


def test_the_owners_page_shows_tokens_by_prefix_scopes_quotas_and_usage(admin_client, settings):
    from access_app.services import api_token_create
    from sessions_app import services as session_services
    from tests.helpers import image_bytes

    settings.SDXL_QUOTA_SESSIONS = 10
    token, plaintext = api_token_create("team a", "ci", ["read", "train"])
    Owner.objects.filter(pk=token.owner_id).update(max_concurrent_trainings=2)
    session = session_services.session_create(owner_id=token.owner_id)
    session_services.session_image_add(session.pk, image_bytes(), "a cat")

    listing = admin_client.get(reverse("admin:access_app_owner_changelist")).content.decode()
    assert "team a" in listing
    assert "sessions 10" in listing and "concurrent trainings 2" in listing
    assert "0.0" in listing  # stored MB of one small image
    page = admin_client.get(reverse("admin:access_app_owner_change", args=[token.owner_id]))
    content = page.content.decode()
    assert token.prefix in content and plaintext not in content
    assert "read" in content and "train" in content
