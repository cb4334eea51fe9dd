import pytest
from rest_framework.test import APIClient

from sessions_app import storage
from sessions_app.models import Session
from tests.helpers import b64, image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "message"}
    assert body["status"] == "error"
    assert fragment in body["message"]


def test_create_session_answers_integer_id(api):
    response = api.get("/create_session")
    assert response.status_code == 200
    body = response.json()
    assert body == {"session_id": Session.objects.get().pk}
    assert isinstance(body["session_id"], int)


def test_paths_with_trailing_slash_answer_without_redirect(api):
    response = api.get("/create_session/")
    assert response.status_code == 200
    session_id = response.json()["session_id"]
    response = api.post(
        "/post_session_image/",
        {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"},
        format="json",
    )
    assert response.status_code == 200


@pytest.mark.parametrize("as_string", [True, False])
def test_post_session_image_accepts_string_or_int_session_id(api, as_string):
    session_id = api.get("/create_session").json()["session_id"]
    response = api.post(
        "/post_session_image",
        {
            "session_id": str(session_id) if as_string else session_id,
            "image_base64": b64(image_bytes("JPEG")),
            "prompt": "a red apple on a wooden table",
        },
        format="json",
    )
    assert response.status_code == 200
    assert response.json() == {"status": "success"}
    assert (storage.session_dir(session_id) / "0" / "0.jpg").exists()


def test_post_session_image_accepts_data_url_prefix(api):
    session_id = api.get("/create_session").json()["session_id"]
    response = api.post(
        "/post_session_image",
        {
            "session_id": session_id,
            "image_base64": "data:image/png;base64," + b64(image_bytes()),
            "prompt": "x",
        },
        format="json",
    )
    assert response.status_code == 200


def test_post_session_image_errors_are_json_and_name_the_field(api):
    session_id = api.get("/create_session").json()["session_id"]
    good = {"session_id": session_id, "image_base64": b64(image_bytes()), "prompt": "x"}
    assert_error(
        api.post("/post_session_image", {**good, "image_base64": "@@@"}, format="json"),
        400,
        "image_base64",
    )
    assert_error(
        api.post("/post_session_image", {**good, "session_id": "abc"}, format="json"),
        400,
        "session_id",
    )
    assert_error(
        api.post("/post_session_image", {**good, "prompt": ""}, format="json"), 400, "prompt"
    )
    assert_error(
        api.post("/post_session_image", {**good, "session_id": 999}, format="json"),
        404,
        "session 999 not found",
    )
    assert_error(
        api.post(
            "/post_session_image", {**good, "image_base64": b64(b"plain text")}, format="json"
        ),
        400,
        "image",
    )
    assert list(storage.session_dir(session_id).iterdir()) == []


def test_malformed_json_unknown_path_and_wrong_method_answer_json(api):
    assert_error(
        api.generic("POST", "/post_session_image", "{not json", content_type="application/json"),
        400,
        "JSON",
    )
    assert_error(api.get("/no_such_endpoint"), 404, "no such endpoint")
    assert_error(api.post("/create_session", {}, format="json"), 405, "POST")


def test_list_sessions_shape(api):
    first = api.get("/create_session").json()["session_id"]
    api.get("/create_session")
    api.post(
        "/post_session_image",
        {"session_id": first, "image_base64": b64(image_bytes()), "prompt": "x"},
        format="json",
    )
    body = api.get("/list_sessions").json()
    assert body["sessions"][0] == {
        "session_id": str(first),
        "latest_lora": None,
        "image_groups": 1,
        "training": {"status": "none", "progress": 0},
    }
    assert len(body["sessions"]) == 2


def test_delete_session(api, django_capture_on_commit_callbacks):
    session_id = api.get("/create_session").json()["session_id"]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/delete_session", {"session_id": str(session_id)}, format="json")
    assert response.json() == {"status": "deleted", "session_id": str(session_id)}
    assert not storage.session_dir(session_id).exists()
    assert_error(
        api.post("/delete_session", {"session_id": session_id}, format="json"), 404, "not found"
    )
