"""/txt2img's prompt_syntax (issue 28): checked before anything is recorded, recorded
when given, and the prompts rendered as it reads them (through the tiny model)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdxl_engine.image_output import read_infotext
from tests.sdxl_service.api.test_session_views import assert_error
from training_app.models import Generation

pytestmark = pytest.mark.django_db

SMALL = {"height": 64, "width": 64, "steps": 5, "seed": 4}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt_syntax": "html"}, "prompt_syntax", "prompt_syntax: must be one of: a1111, plain"),
        ({"prompt_syntax": 1}, "prompt_syntax", "prompt_syntax: must be one of: a1111, plain"),
        ({"prompt": "a (fox:1.2.3)"}, "prompt", "prompt: (1.2.3) is not a weight"),
        ({"negative_prompt": "(x:.)"}, "negative_prompt", "negative_prompt: (.) is not a weight"),
    ],
)
def test_prompt_syntax_and_unreadable_weights_are_400_naming_the_field(
    api, generations_in_process, body, field, message
):
    response = api.post("/txt2img", {"prompt": "x", **body}, format="json")
    assert_error(response, 400, field)
    assert response.json()["message"].startswith(message)
    assert not Generation.objects.exists()


def _pixels(answer: dict) -> np.ndarray:
    data = base64.b64decode(answer["images_base64"][0])
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def test_prompt_syntax_is_recorded_and_reads_the_prompt(api, generations_in_process):
    weighted = "a (red:1.5) fox"
    default = api.post("/txt2img", {"prompt": weighted, **SMALL}, format="json").json()
    plain = api.post(
        "/txt2img", {"prompt": weighted, "prompt_syntax": "plain", **SMALL}, format="json"
    ).json()
    unweighted = api.post("/txt2img", {"prompt": "a red fox", **SMALL}, format="json").json()

    assert "prompt_syntax" not in default["parameters"]
    assert plain["parameters"]["prompt_syntax"] == "plain"
    first, second = Generation.objects.order_by("pk")[:2]
    assert "prompt_syntax" not in first.parameters
    assert second.parameters["prompt_syntax"] == "plain"
    # The weight changes the image; read as plain text the brackets are characters.
    assert np.abs(_pixels(default) - _pixels(unweighted)).mean() > 0.1
    assert np.abs(_pixels(plain) - _pixels(default)).mean() > 0.1
    text = read_infotext(base64.b64decode(plain["images_base64"][0]))
    assert text is not None and text.startswith(weighted + "\n") and "Emphasis: None" in text


@pytest.mark.one_pass  # rendering, not the database: the SQLite pass is enough
def test_a_long_prompts_tail_changes_the_image(api, generations_in_process):
    """Past 77 tokens diffusers cut the prompt: two prompts differing only after that gave
    one image. In 75-token chunks the tail is encoded too."""
    head = ", ".join(f"word{index}" for index in range(60))  # far past 77 tokens

    answers = [
        api.post("/txt2img", {"prompt": f"{head}, {tail}", **SMALL}, format="json").json()
        for tail in ("a red fox", "a blue whale")
    ]

    assert np.abs(_pixels(answers[0]) - _pixels(answers[1])).max() > 0
