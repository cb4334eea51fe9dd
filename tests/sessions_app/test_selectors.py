"""Whose sessions a caller sees: sessions_visible, the one place that decides it."""

import pytest

from access_app.callers import Caller
from access_app.selectors import default_owner
from sessions_app.models import Session
from sessions_app import storage
from sessions_app.selectors import owner_stored_bytes, sessions_visible

pytestmark = pytest.mark.django_db


def test_a_caller_without_an_owner_sees_the_default_owners_sessions():
    """A Caller's owner_id None stands for the default owner (access_app.callers), so a
    caller without one and without the admin scope sees the default owner's sessions, not
    the rows without an owner, which only admin tokens see."""
    default_owners = Session.objects.create(owner=default_owner())
    Session.objects.create(owner=None)
    reader = Caller("reader", owner_id=None, scopes=frozenset({"read"}))
    assert list(sessions_visible(reader)) == [default_owners]


def test_an_owners_stored_bytes_are_every_file_of_its_sessions_and_generations(settings):
    """Measured on disk: images and captions, LoRAs, checkpoints, samples and generated
    images all count; another owner's files and the service's hidden working files do not."""
    from access_app.models import Owner
    from training_app.models import Generation

    owner, other = Owner.objects.create(name="o"), Owner.objects.create(name="p")
    session = Session.objects.create(owner=owner)
    folder = storage.session_dir(session.pk)
    files = {
        "0/0.png": 100,
        "0/0.txt": 3,
        "lora_1.safetensors": 1000,
        "checkpoints/lora_run1_step1.safetensors": 900,
        "samples/run_1/step1_0.png": 50,
        # Working files: a run's resume state, a write in progress, a delete under way.
        ".resume-run-1/state.pt": 10_000,
        "0/.0.png.abc.tmp": 10_000,
    }
    for name, size in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x" * size)
    (settings.SESSION_DATA_DIR / ".deleted-session_99-abc").mkdir(parents=True)
    generation = Generation.objects.create(prompt="a", seed=1, owner=owner)
    others = Generation.objects.create(prompt="b", seed=1, owner=other)
    for made, size in ((generation, 70), (others, 5000)):
        made_folder = settings.GENERATIONS_DIR / str(made.pk)
        made_folder.mkdir(parents=True)
        (made_folder / "0.png").write_bytes(b"x" * size)

    assert owner_stored_bytes(owner.pk) == 100 + 3 + 1000 + 900 + 50 + 70
    assert owner_stored_bytes(other.pk) == 5000
    storage.remove_tree(folder)  # a session deleted meanwhile counts for nothing
    assert owner_stored_bytes(owner.pk) == 70
