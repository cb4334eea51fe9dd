"""Whose sessions a caller sees: sessions_visible, the one place that decides it."""

import pytest

from access_app.callers import Caller
from access_app.selectors import default_owner
from sessions_app.models import Session
from sessions_app.selectors import sessions_visible

pytestmark = pytest.mark.django_db


def test_a_caller_without_an_owner_sees_the_default_owners_sessions():
    """A Caller's owner_id None stands for the default owner (access_app.callers), so a
    caller without one and without the admin scope sees the default owner's sessions, not
    the rows without an owner, which only admin tokens see."""
    default_owners = Session.objects.create(owner=default_owner())
    Session.objects.create(owner=None)
    reader = Caller("reader", owner_id=None, scopes=frozenset({"read"}))
    assert list(sessions_visible(reader)) == [default_owners]
