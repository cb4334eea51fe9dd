"""With any API token configured, every endpoint needs `Authorization: Bearer <token>`."""

import pytest
from rest_framework.test import APIClient

from access_app import services
from access_app.models import ApiToken, Owner
from sessions_app.models import Session
from tests.sdxl_service.api.test_session_views import assert_error

pytestmark = pytest.mark.django_db

ENV_TOKEN = "env-token-0123456789abcdef"
ENDPOINTS = [
    ("GET", "/create_session"),
    ("GET", "/list_sessions"),
    ("POST", "/post_session_image"),
    ("POST", "/delete_session"),
    ("POST", "/train_lora"),
    ("POST", "/train_status"),
    ("POST", "/get_lora"),
    ("POST", "/upload_lora"),
    ("POST", "/txt2img"),
]


def _call(method: str, path: str, authorization: str | None = None):
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization is not None else {}
    if method == "GET":
        return APIClient().get(path, **headers)
    return APIClient().post(path, {"session_id": "1"}, format="json", **headers)


@pytest.fixture
def env_token(settings):
    settings.SDXL_API_TOKENS = ["another-env-token", ENV_TOKEN]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {ENV_TOKEN}", ENV_TOKEN, "Token x"],
    ids=["none", "empty", "no token", "blank", "wrong", "basic", "bare", "other scheme"],
)
@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_answers_401_json_without_a_valid_token(
    env_token, method, path, authorization
):
    for url in (path, f"{path}/"):
        response = _call(method, url, authorization)
        assert_error(response, 401, "token")
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert not Session.objects.exists()  # /create_session created nothing


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_endpoint_takes_a_token_from_the_environment(env_token, method, path):
    response = _call(method, path, f"Bearer {ENV_TOKEN}")
    assert response.status_code != 401, response.content


def test_an_admin_token_works_and_only_its_hash_is_stored():
    plaintext = services.api_token_issue(ApiToken(name="ci", owner=Owner.objects.create(name="ci")))
    token = ApiToken.objects.get()
    assert plaintext not in {token.name, token.prefix, token.sha256}
    assert len(token.sha256) == 64 and plaintext.startswith(token.prefix)

    assert_error(_call("GET", "/create_session"), 401, "token")
    assert _call("GET", "/create_session", f"Bearer {plaintext}").status_code == 200
    assert _call("GET", "/create_session", f"bearer  {plaintext} ").status_code == 200
    assert_error(_call("GET", "/create_session", f"Bearer {plaintext}x"), 401, "not valid")

    token.delete()  # revoked: with no token left, the API is open again (loopback only)
    assert _call("GET", "/create_session", f"Bearer {plaintext}").status_code == 200


def test_without_any_token_the_api_is_open():
    assert _call("GET", "/create_session").status_code == 200
    assert _call("GET", "/create_session", "Bearer anything").status_code == 200


def test_the_admin_keeps_djangos_login(env_token, client, admin_client):
    response = client.get("/admin/", HTTP_AUTHORIZATION=f"Bearer {ENV_TOKEN}")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert admin_client.get("/admin/").status_code == 200
    # A staff login is no API token.
    assert admin_client.get("/create_session").status_code == 401


def test_sample_images_have_the_apis_access_rules(env_token):
    assert_error(_call("GET", "/training_samples/1.png"), 401, "token")
    # With the token it gets as far as the lookup: no such sample.
    assert_error(_call("GET", "/training_samples/1.png", f"Bearer {ENV_TOKEN}"), 404, "sample 1")
