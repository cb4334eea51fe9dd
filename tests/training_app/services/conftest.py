import pytest

from sessions_app import services as session_services
from tests.helpers import image_bytes


@pytest.fixture
def session_with_images():
    session = session_services.session_create()
    for color in ("red", "green", "blue"):
        session_services.session_image_add(session.pk, image_bytes("PNG", (80, 64), color), color)
    return session
