"""`manage.py check --deploy` passes with production settings, all from the environment."""

import os
import secrets
import subprocess
import sys

import pytest

from tests.processes import REPO

PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_ALLOWED_HOSTS": "sdxl.example.com",
    "DJANGO_HTTPS": "true",
}


def _check_deploy(tmp_path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SDXL_"))}
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env={**base, "SDXL_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_pass_check_deploy(tmp_path):
    result = _check_deploy(tmp_path, **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("change", "warning"),
    [
        ({"DJANGO_DEBUG": "true"}, "security.W018"),
        ({"DJANGO_SECRET_KEY": ""}, "security.W009"),  # unset: the development key
        ({"DJANGO_HTTPS": "false"}, "security.W008"),
        ({"DJANGO_HSTS_SECONDS": "0"}, "security.W004"),
        ({"DJANGO_HSTS_INCLUDE_SUBDOMAINS": "false"}, "security.W005"),
    ],
)
def test_each_production_setting_is_needed(tmp_path, change, warning):
    env = {**PRODUCTION, **change}
    env = {key: value for key, value in env.items() if value}
    result = _check_deploy(tmp_path, **env)
    assert result.returncode != 0
    assert warning in result.stdout + result.stderr


def test_https_turns_on_secure_cookies_and_hsts(tmp_path):
    code = (
        "from django.conf import settings as s;"
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT,"
        " s.SECURE_HSTS_SECONDS, s.DEBUG)"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "SDXL_"))}
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=REPO,
        env={**base, "SDXL_DATA_DIR": str(tmp_path), **PRODUCTION},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == ["True", "True", "True", "31536000", "False"]
