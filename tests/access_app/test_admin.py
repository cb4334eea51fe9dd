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
