"""create_token prints a token once, list_tokens shows prefixes only, revoke_token ends it."""

import io

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from access_app.models import ApiToken, Owner

pytestmark = pytest.mark.django_db


def _run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _status(token: str, path: str = "/list_sessions") -> int:
    return APIClient().get(path, HTTP_AUTHORIZATION=f"Bearer {token}").status_code


def test_create_token_prints_a_working_token_once_and_stores_its_hash():
    out, err = _run("create_token", "--owner", "team a", "--scopes", "read,generate")
    plaintext = out.strip()
    token = ApiToken.objects.get()
    assert (token.owner.name, token.scopes) == ("team a", ["read", "generate"])
    assert plaintext.startswith(token.prefix) and plaintext not in token.sha256
    assert "cannot be shown again" in err and plaintext not in err
    assert _status(plaintext) == 200
    assert _status(plaintext, "/create_session") == 403  # no upload scope


def test_create_token_defaults_to_every_scope_but_admin_and_reuses_the_owner():
    _run("create_token", "--owner", "team a")
    _run("create_token", "--owner", "team a", "--scopes", "admin")
    assert Owner.objects.get().name == "team a"
    assert [token.scopes for token in ApiToken.objects.order_by("id")] == [
        ["read", "upload", "train", "generate", "delete"],
        ["admin"],
    ]


@pytest.mark.parametrize(
    ("scopes", "message"), [("read,root", "unknown scopes: root"), (",", "at least one")]
)
def test_create_token_refuses_unknown_or_no_scopes_and_creates_nothing(scopes, message):
    with pytest.raises(CommandError, match=message):
        _run("create_token", "--owner", "team a", "--scopes", scopes)
    assert not ApiToken.objects.exists() and not Owner.objects.exists()


def test_list_tokens_shows_prefixes_owners_and_scopes_never_the_token():
    first = _run("create_token", "--owner", "team a", "--scopes", "read")[0].strip()
    second = _run("create_token", "--owner", "team b")[0].strip()
    out, _ = _run("list_tokens")
    assert first not in out and second not in out
    assert first[:9] in out and second[:9] in out
    assert "team a" in out and "read\t" in out and "2 tokens" in out
    only_b, _ = _run("list_tokens", "--owner", "team b")
    assert "team a" not in only_b and "1 tokens" in only_b


def test_revoke_token_by_prefix_or_id_ends_it_at_once():
    first = _run("create_token", "--owner", "team a")[0].strip()
    second = _run("create_token", "--owner", "team a")[0].strip()
    assert _status(first) == 200
    first_row, second_row = ApiToken.objects.order_by("id")
    out, _ = _run("revoke_token", first_row.prefix)
    assert f"revoked API token {first_row.prefix}… (team a) of team a" in out
    assert _status(first) == 401 and _status(second) == 200
    _run("revoke_token", str(second_row.pk))
    assert not ApiToken.objects.exists()
    with pytest.raises(CommandError, match="no API token"):
        _run("revoke_token", "sdxl_nope")


def _session_of(owner_name: str) -> int:
    from sessions_app.services import session_create

    return session_create(owner_id=Owner.objects.get_or_create(name=owner_name)[0].pk).pk


def test_create_token_says_whose_sessions_the_new_token_sees_and_how_to_reach_the_rest():
    for _ in range(3):
        _session_of("default")  # made before any token
    _session_of("bob")

    out, err = _run("create_token", "--owner", "alice")

    assert "Owner 'alice' has 0 sessions; this token sees only those." in err
    assert "4 other sessions belong to other owners ('bob': 1, 'default': 3)" in err
    assert "bin/manage reassign_owner default alice --dry-run" in err
    assert "bin/manage create_token --owner default" in err
    assert out.strip() not in err
    # What it says is what the API answers: alice sees none of them yet.
    listed = APIClient().get("/list_sessions", HTTP_AUTHORIZATION=f"Bearer {out.strip()}")
    assert listed.json() == {"sessions": []}


def test_create_token_says_nothing_of_other_owners_when_there_are_none():
    _session_of("alice")
    _out, err = _run("create_token", "--owner", "alice")
    assert "Owner 'alice' has 1 session; this token sees only those." in err
    assert "reassign_owner" not in err
    _out, err = _run("create_token", "--owner", "ops", "--scopes", "admin")
    assert "An admin token sees every owner's sessions (1 now)." in err
