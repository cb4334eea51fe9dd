"""Data from before owners belongs to the default owner; tokens from before scopes keep
doing everything (they become admin tokens)."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [
    ("access_app", "0001_initial"),
    ("sessions_app", "0001_initial"),
    ("training_app", "0007_generation_heartbeat_cancelled"),
]
AFTER = [
    ("access_app", "0002_owners_and_scopes"),
    ("sessions_app", "0002_session_owner"),
    ("training_app", "0008_generation_owner"),
]


@pytest.fixture(autouse=True)
def back_to_the_latest():
    """The tests after these expect every migration applied."""
    yield
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def test_rows_from_before_owners_belong_to_the_default_owner():
    old = _migrate(BEFORE)
    session = old.get_model("sessions_app", "Session").objects.create()
    generation = old.get_model("training_app", "Generation").objects.create(prompt="x", seed=1)
    old.get_model("access_app", "ApiToken").objects.create(name="ci", prefix="p", sha256="0" * 64)

    new = _migrate(AFTER)

    (owner,) = new.get_model("access_app", "Owner").objects.all()
    assert owner.name == "default"
    assert new.get_model("sessions_app", "Session").objects.get(pk=session.pk).owner_id == owner.pk
    generations = new.get_model("training_app", "Generation").objects
    assert generations.get(pk=generation.pk).owner_id == owner.pk
    token = new.get_model("access_app", "ApiToken").objects.get()
    assert token.owner_id == owner.pk and "admin" in token.scopes


def test_an_empty_database_gets_no_owner_until_one_is_needed():
    _migrate(BEFORE)
    new = _migrate(AFTER)
    assert not new.get_model("access_app", "Owner").objects.exists()
