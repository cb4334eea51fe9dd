"""Issue 25, points 5 to 7: the embedded default is fast (the tiny model's native size and a
capped recipe; img2img keeps its aspect ratio), the finished LoRA has samples, and
/train_lora and /txt2img say what they will run."""

import base64
import io
from dataclasses import asdict

import pytest
from PIL import Image

from sdxl_engine.parameters import training_params
from sessions_app import services as session_services
from tests.helpers import b64, image_bytes
from training_app.models import Generation, TrainingRun
from training_app.services import runs as run_services

pytestmark = pytest.mark.django_db


@pytest.fixture
def session():
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    session_services.session_image_add(session.pk, image_bytes(size=(40, 60)), "a tall one")
    return session


def _train(api, body: dict) -> dict:
    response = api.post("/train_lora", body, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def test_a_default_training_on_the_tiny_model_answers_and_records_the_capped_recipe(api, session):
    answer = _train(api, {"session_id": str(session.pk)})

    run = TrainingRun.objects.get()
    assert (answer["status"], answer["run_id"]) == ("started", run.pk)  # the original keys
    assert answer["recipe"] == {
        "name": "service",
        "model": "tiny",
        "steps": 100,
        "epochs": None,
        "batch_size": 4,
        "rank": 32,
        "learning_rate": 0.0001,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 10,
        "resolution": 64,
        "enable_bucket": True,
        "train_text_encoder": False,
        "masked_loss": False,
        "background_weight": 0.0,
        "use_alpha_mask": False,
        "prior_preservation_weight": 0.0,
        "class_prompt": None,
        "sample_steps": [25, 50, 75, 100],
        "checkpoint_steps": [25, 50, 75],
        "init_lora": None,
    }
    assert run.parameters == asdict(training_params({}, 2, tiny=True))
    assert (run.parameters["steps"], run.parameters["epochs"]) == (100, None)


def test_giving_steps_answers_that_the_original_recipe_trains(api, session):
    answer = _train(api, {"session_id": session.pk, "steps": 10, "sample_every": 4})

    recipe = answer["recipe"]
    assert (recipe["name"], recipe["steps"], recipe["epochs"]) == ("original", 10, None)
    assert (recipe["rank"], recipe["enable_bucket"], recipe["lr_scheduler"]) == (
        4,
        False,
        "constant",
    )
    assert recipe["sample_steps"] == [4, 8, 10]  # and the last step
    assert recipe["checkpoint_steps"] == []


def test_real_sdxl_keeps_todays_recipe_and_answers_its_length_in_epochs(api, session, settings):
    settings.SDXL_MODEL_PRESET = "hub"
    answer = _train(api, {"session_id": session.pk})

    run = TrainingRun.objects.get()
    assert run.parameters == asdict(training_params({}, 2))  # uncapped: 750 epochs
    assert run.parameters["epochs"] == 750 and run.parameters["steps"] is None
    recipe = answer["recipe"]
    assert (recipe["model"], recipe["steps"], recipe["epochs"]) == ("hub", None, 750)
    assert (recipe["resolution"], recipe["sample_steps"], recipe["checkpoint_steps"]) == (
        1024,
        None,
        None,
    )


def test_the_finished_lora_has_samples_at_the_last_step(api, session):
    body = {"session_id": session.pk, "steps": 5, "sample_every": 2, "sample_prompts": ["x"]}
    assert _train(api, body)["recipe"]["sample_steps"] == [2, 4, 5]
    run_services.training_run_execute(TrainingRun.objects.get().pk)

    status = api.post("/train_status", {"session_id": session.pk}, format="json").json()
    assert status["status"] == "completed", status
    assert [sample["step"] for sample in status["samples"]] == [2, 4, 5]
    last = api.get(status["samples"][-1]["url"])
    assert last.status_code == 200
    picture = Image.open(io.BytesIO(b"".join(last.streaming_content)))
    assert picture.size == (64, 64)


def _decoded(answer: dict, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["images_base64"][index])))


def test_txt2img_without_a_size_is_the_tiny_models_native_size_and_answers_its_parameters(
    api, generations_in_process
):
    response = api.post("/txt2img", {"prompt": "x", "steps": 5}, format="json")

    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["parameters"] == {
        "num_images": 1,
        "width": 64,
        "height": 64,
        "steps": 5,
        "guidance_scale": 7.0,
    }
    assert _decoded(answer).size == (64, 64)
    assert answer["seed"] == Generation.objects.get().seed  # the keys it had stay
    status = api.get(f"/generations/{answer['generation_id']}").json()
    assert status["parameters"] == answer["parameters"]


def test_txt2img_answers_the_parameters_it_was_given(api, generations_in_process):
    body = {"prompt": "x", "steps": 6, "width": 96, "height": 64, "guidance_scale": 3.5}
    answer = api.post("/txt2img", {**body, "scheduler": "ddim"}, format="json").json()

    assert answer["parameters"] == {
        "num_images": 1,
        "width": 96,
        "height": 64,
        "steps": 6,
        "guidance_scale": 3.5,
        "scheduler": "ddim",
    }
    assert _decoded(answer).size == (96, 64)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((192, 96), (128, 64)), ((90, 150), (64, 104)), ((64, 64), (64, 64)), ((700, 100), (448, 64))],
)
def test_img2img_without_a_size_keeps_the_init_images_aspect_ratio(
    api, generations_in_process, size, expected
):
    body = {
        "prompt": "x",
        "steps": 5,
        "init_image_base64": b64(image_bytes(size=size)),
        "strength": 0.6,
    }
    answer = api.post("/txt2img", body, format="json").json()

    width, height = expected
    assert (answer["parameters"]["width"], answer["parameters"]["height"]) == expected
    assert _decoded(answer).size == (width, height)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(None, (1024, 1024)), ((1600, 900), (1368, 768)), ((600, 800), (888, 1184))],
)
def test_real_sdxl_keeps_1024_and_img2img_its_aspect_at_about_1024_squared(
    api, generation_worker, settings, size, expected
):
    settings.SDXL_MODEL_PRESET = "hub"
    body: dict = {"prompt": "x", "async": True}
    if size is not None:
        body |= {"init_image_base64": b64(image_bytes(size=size))}
    assert api.post("/txt2img", body, format="json").status_code == 202

    recorded = Generation.objects.get().parameters
    assert (recorded["width"], recorded["height"]) == expected


def test_a_default_size_is_capped_at_the_largest_side(api, generation_worker, settings):
    settings.SDXL_MODEL_PRESET = "hub"
    settings.SDXL_MAX_IMAGE_SIDE = 768
    assert api.post("/txt2img", {"prompt": "x", "async": True}, format="json").status_code == 202
    recorded = Generation.objects.get().parameters
    assert (recorded["width"], recorded["height"]) == (768, 768)
