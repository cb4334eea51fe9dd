"""The OpenAPI description shows what the API really enforces: defaults within their
ranges, multiples, non-blank strings, ids from 1, and every error answer an endpoint may
give (401, 405, 415, 503, 507); and the API answers as described."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from tests.sdxl_service.api.test_session_views import assert_error

REPO = Path(__file__).resolve().parents[3]


def request_properties(schema_document):
    for name, component in schema_document["components"]["schemas"].items():
        for field, prop in component.get("properties", {}).items():
            yield f"{name}.{field}", prop


def test_every_default_is_within_its_range_and_multiple(schema_document):
    checked = 0
    for name, prop in request_properties(schema_document):
        if prop.get("type") not in ("integer", "number") or "default" not in prop:
            continue
        default = prop["default"]
        assert prop.get("minimum", default) <= default <= prop.get("maximum", default), name
        # Only a stated multiple: a number's default may be a fraction (face_detail.strength).
        if "multipleOf" in prop:
            assert default % prop["multipleOf"] == 0, name
        checked += 1
    # num_images, guidance_scale, steps, scales (height and width: the model's native size,
    # no fixed default)
    assert checked >= 5


def test_multiples_and_non_blank_strings_are_described(schema_document):
    schemas = schema_document["components"]["schemas"]
    txt2img, train = schemas["Txt2Img"]["properties"], schemas["TrainLora"]["properties"]
    assert txt2img["height"]["multipleOf"] == txt2img["width"]["multipleOf"] == 8
    assert train["resolution"]["multipleOf"] == 64
    assert txt2img["prompt"]["minLength"] == 1
    assert train["trigger"]["minLength"] == 1
    assert train["sample_prompts"]["items"]["minLength"] == 1
    # A training image's prompt may be empty (the trigger alone): no minLength.
    assert "minLength" not in schemas["PostSessionImage"]["properties"]["prompt"]
    assert "minLength" not in txt2img["negative_prompt"]


@pytest.mark.django_db
def test_a_side_that_is_no_multiple_of_8_is_refused_as_described():
    response = APIClient().post(
        "/txt2img", {"prompt": "x", "height": 100, "width": 64}, format="json"
    )
    assert_error(response, 400, "height: must be a multiple of 8")


def test_session_ids_start_at_1_in_the_schema(schema_document):
    integer, text = schema_document["components"]["schemas"]["SessionRef"]["properties"][
        "session_id"
    ]["oneOf"]
    assert integer["minimum"] == 1
    pattern = re.compile(text["pattern"])
    assert not any(pattern.search(value) for value in ("0", "000", "-1", ""))
    assert all(pattern.search(value) for value in ("1", "10", "007"))
    detail = schema_document["paths"]["/sessions/{session_id}"]["get"]
    (parameter,) = detail["parameters"]
    assert parameter["schema"]["minimum"] == 1


@pytest.mark.django_db
@pytest.mark.parametrize("session_id", [0, "0", "000"])
def test_session_id_0_is_refused_in_a_body_with_400(session_id):
    response = APIClient().post("/train_status", {"session_id": session_id}, format="json")
    assert_error(response, 400, "session_id: must be a positive integer or a string of digits")


@pytest.mark.django_db
def test_session_0_in_a_path_is_404_as_any_session_that_does_not_exist():
    assert_error(APIClient().get("/sessions/0"), 404, "session 0 not found")


def test_common_error_answers_are_documented(schema_document):
    for path, methods in schema_document["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            assert "405" in responses and "503" in responses, (path, method)
            open_to_all = operation["operationId"] == "healthz"
            assert ("401" in responses) != open_to_all, (path, method)
            assert ("415" in responses) == ("requestBody" in operation), (path, method)
            if method == "post":
                assert "507" in responses, path
    assert "507" in schema_document["paths"]["/create_session"]["get"]["responses"]


@pytest.mark.django_db
def test_the_documented_401_405_and_415_are_answered(settings):
    api = APIClient()
    assert_error(api.get("/post_session_image"), 405, 'Method "GET" not allowed.')
    response = api.post("/train_status", "session_id=1", content_type="text/plain")
    assert_error(response, 415, 'Unsupported media type "text/plain" in request.')
    settings.SDXL_API_TOKENS = ["a-token"]
    response = api.post("/train_status", {"session_id": 1}, format="json")
    assert_error(response, 401, "")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_session_creation_leaves_no_row_when_its_folder_cannot_be_made(monkeypatch):
    from sessions_app import storage
    from sessions_app.models import Session

    def no_space(session_id):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "session_dir", no_space)
    response = APIClient().get("/create_session")
    assert response.status_code == 507
    assert not Session.objects.exists()


@pytest.mark.parametrize("name", ["SDXL_MAX_IMAGE_SIDE", "SDXL_MAX_NUM_IMAGES"])
def test_a_limit_below_the_smallest_value_the_api_takes_is_refused_at_start(tmp_path, name):
    value = {"SDXL_MAX_IMAGE_SIDE": "32", "SDXL_MAX_NUM_IMAGES": "0"}[name]
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env={**os.environ, "SDXL_DATA_DIR": str(tmp_path), name: value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"{name} must be at least" in result.stderr
