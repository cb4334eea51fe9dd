"""A training run keeps to the service's limits when the request leaves a value out, and
a given length that surely passes SDXL_MAX_TRAINING_STEPS is refused like given steps."""

from types import SimpleNamespace

import pytest
from rest_framework.test import APIClient

from sdxl_engine.parameters import TrainingParams
from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import TrainingRun
from training_app.services import runs

pytestmark = pytest.mark.django_db


@pytest.fixture
def ten_images():
    session = session_services.session_create()
    for number in range(10):
        session_services.session_image_add(session.pk, image_bytes(), f"photo {number}")
    return session


def test_a_left_out_length_is_capped_at_max_training_steps(settings, ten_images):
    settings.SDXL_MAX_TRAINING_STEPS = 100
    response = APIClient().post("/train_lora", {"session_id": ten_images.pk}, format="json")
    assert response.status_code == 200, response.content
    recorded = TrainingParams(**TrainingRun.objects.get().parameters)
    assert (recorded.steps, recorded.epochs, recorded.recipe) == (100, None, "service")


def test_given_epochs_past_max_training_steps_are_refused(settings, ten_images):
    settings.SDXL_MAX_TRAINING_STEPS = 100
    body = {"session_id": ten_images.pk, "epochs": 50, "batch_size": 2}
    response = APIClient().post("/train_lora", body, format="json")
    assert_error(
        response,
        400,
        "epochs: 50 epochs of 10 images at batch_size 2 take at least 250 steps, more than "
        "the limit of 100 (SDXL_MAX_TRAINING_STEPS)",
    )
    assert not TrainingRun.objects.exists()
    # Within the limit, epochs are taken as given.
    body["epochs"] = 20
    assert APIClient().post("/train_lora", body, format="json").status_code == 200
    assert TrainingRun.objects.get().parameters["epochs"] == 20


def base_of_native_side(side: int):
    """What _within_image_side_limit reads of a Base pipeline: its native side."""
    return SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=side // 8)), vae_scale_factor=8
    )


@pytest.mark.parametrize(
    ("max_side", "native", "given", "trained"),
    [
        (300, 1024, None, 256),  # left out: native, capped at the multiple of 64 within
        (2048, 1024, None, None),  # left out and within the limit: native, as before
        (300, 128, None, None),  # the tiny model's native side is within
        (300, 1024, 192, 192),  # given: checked by the serializer already
    ],
)
def test_a_left_out_resolution_trains_within_max_image_side(
    settings, max_side, native, given, trained
):
    settings.SDXL_MAX_IMAGE_SIDE = max_side
    params = TrainingParams(resolution=given)
    chosen = runs._within_image_side_limit(params, base_of_native_side(native))
    assert chosen.resolution == trained
