"""The admin login is limited by django-axes: after SDXL_ADMIN_LOGIN_FAILURES failures of
one username from one address, even the right password is refused until the cool-off
passes; the API's bearer tokens are not counted or refused."""

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import F
from django.test import Client
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

PASSWORD = "the-right-password-42"
ENV_TOKEN = "env-token-0123456789abcdef"


def _login(client: Client, password: str, address: str = "203.0.113.7"):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": "root", "password": password},
        REMOTE_ADDR=address,
    )


def _logged_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.fixture
def admin_user(settings):
    # A fast hash: each login checks the password, and the real one is slow by design.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return User.objects.create_superuser("root", "root@example.com", PASSWORD)


def test_failed_logins_lock_the_pair_out_until_the_cool_off_passes(admin_user, settings):
    settings.SDXL_API_TOKENS = [ENV_TOKEN]
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "wrong").status_code == 200  # the form again, with its error

    locked = _login(client, "wrong")
    assert locked.status_code == 429
    assert b"too many login attempts" in locked.content
    assert _login(client, PASSWORD).status_code == 429
    assert not _logged_in(client)

    # The API answers the same address as before: tokens never meet the login limit.
    api = APIClient().get(
        "/list_sessions", HTTP_AUTHORIZATION=f"Bearer {ENV_TOKEN}", REMOTE_ADDR="203.0.113.7"
    )
    assert api.status_code == 200
    # Another address is not locked out: an attacker cannot lock the operator out.
    other = Client()
    assert _login(other, PASSWORD, address="198.51.100.1").status_code == 302
    assert _logged_in(other)

    # Once the cool-off has passed, the right password logs in again.
    from axes.models import AccessAttempt  # an app only where the limit is installed

    AccessAttempt.objects.update(attempt_time=F("attempt_time") - settings.AXES_COOLOFF_TIME)
    assert _login(client, PASSWORD).status_code == 302
    assert _logged_in(client)


def test_a_success_forgets_the_failures(admin_user):
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 302
    client.logout()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, "wrong")
    assert _login(client, PASSWORD).status_code == 302


@pytest.mark.parametrize(
    ("behind_proxy", "forwarded", "counted"),
    [
        (False, "192.0.2.1", "10.0.0.2"),  # a client's header is not believed
        (True, "192.0.2.1, 203.0.113.9", "203.0.113.9"),  # the proxy's last entry
        (True, "", "10.0.0.2"),
    ],
)
def test_the_address_counted_is_one_a_client_cannot_forge(
    settings, behind_proxy, forwarded, counted
):
    from django.test import RequestFactory

    from access_app.client_ip import client_ip

    settings.SDXL_BEHIND_PROXY = behind_proxy
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip(request) == counted
