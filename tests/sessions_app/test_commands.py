"""reassign_owner gives sessions (and generations) to another owner, as the API then shows."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from access_app.models import Owner
from access_app.services import api_token_create
from sessions_app import services
from sessions_app.models import Session
from tests.helpers import image_bytes
from training_app.models import Generation, TrainingRun

pytestmark = pytest.mark.django_db


def _run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _api(owner: str) -> APIClient:
    _token, plaintext = api_token_create(owner, f"{owner}'s token")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


@pytest.fixture
def before_tokens() -> tuple[list[int], int]:
    """Two sessions and a generation made while the API was open: the default owner's."""
    api = APIClient()
    ids = [api.get("/create_session").json()["session_id"] for _ in range(2)]
    services.session_image_add(ids[0], image_bytes(), "a red square")
    TrainingRun.objects.create(session_id=ids[0], status="completed", parameters={})
    generation = Generation.objects.create(
        prompt="a cat",
        seed=1,
        parameters={"num_images": 1, "height": 64, "width": 64, "guidance_scale": 5, "steps": 2},
        owner=Session.objects.get(pk=ids[0]).owner,
        status=Generation.Status.COMPLETED,
        finished_at=timezone.now(),
    )
    return ids, generation.pk


def _visible(api: APIClient, ids: list[int], generation_id: int) -> list[int]:
    paths = [f"/sessions/{i}" for i in ids] + [f"/generations/{generation_id}"]
    return [api.get(path).status_code for path in paths]


def test_reassign_owner_moves_every_session_and_generation_and_the_api_follows(before_tokens):
    ids, generation_id = before_tokens
    alice = _api("alice")
    assert alice.get("/list_sessions").json() == {"sessions": []}
    assert _visible(alice, ids, generation_id) == [404, 404, 404]

    dry = _run("reassign_owner", "default", "alice", "--dry-run")

    assert f"would move 2 sessions: {ids[0]}, {ids[1]} and 1 generations" in dry
    assert _visible(alice, ids, generation_id) == [404, 404, 404]  # nothing moved

    done = _run("reassign_owner", "default", "alice")

    assert f"moved 2 sessions: {ids[0]}, {ids[1]} and 1 generations" in done
    assert set(Session.objects.values_list("owner__name", flat=True)) == {"alice"}
    assert Generation.objects.get().owner.name == "alice"
    assert [s["session_id"] for s in alice.get("/list_sessions").json()["sessions"]] == [
        str(i) for i in ids
    ]
    assert _visible(alice, ids, generation_id) == [200, 200, 200]
    detail = alice.get(f"/sessions/{ids[0]}").json()
    assert len(detail["images"]) == 1 and len(detail["runs"]) == 1  # they came along
    assert _visible(_api("default"), ids, generation_id) == [404, 404, 404]


def test_reassign_owner_moves_only_the_sessions_named(before_tokens):
    ids, generation_id = before_tokens
    out = _run("reassign_owner", "default", "bob", "--session", str(ids[1]))
    assert f"moved 1 sessions: {ids[1]} and 0 generations" in out
    bob = _api("bob")
    assert _visible(bob, ids, generation_id) == [404, 200, 404]
    assert Session.objects.get(pk=ids[0]).owner.name == "default"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "alice"], "no owner 'nobody'"),
        (["default", "default"], "are the same owner"),
        (["default", "alice", "--session", "987654"], "owner 'default' has no session 987654"),
    ],
)
def test_reassign_owner_refuses_and_moves_nothing(before_tokens, args, message):
    with pytest.raises(CommandError, match=message):
        _run("reassign_owner", *args)
    assert set(Session.objects.values_list("owner__name", flat=True)) == {"default"}
    assert not Owner.objects.filter(name="alice").exists()
