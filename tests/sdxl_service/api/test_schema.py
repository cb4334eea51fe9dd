"""The OpenAPI description: valid, complete, and its documentation pages work offline."""

import io
import re

import pytest
from django.core.management import call_command
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

ENDPOINTS = {
    "/create_session": "get",
    "/post_session_image": "post",
    "/train_lora": "post",
    "/train_status": "post",
    "/get_lora": "post",
    "/upload_lora": "post",
    "/list_sessions": "get",
    "/delete_session": "post",
    "/txt2img": "post",
}
ADDITIONS = {
    "/cancel_training": "post",
    "/training_samples/{sample_id}.png": "get",
    "/generations/{generation_id}": "get",
    "/generations/{generation_id}/cancel": "post",
    "/generations/{generation_id}/{index}.{extension}": "get",
    "/sessions/{session_id}": "get",
    "/sessions/{session_id}/images/{image_id}": "get",
    "/sessions/{session_id}/images": "post",
    "/sessions/{session_id}/masks": "post",
    "/sessions/{session_id}/captions": "post",
    "/sessions/{session_id}/images/{image_id}/mask": "get",
    "/sessions/{session_id}/loras/{lora_filename}": "get",
    "/healthz": "get",
    "/runs/{run_id}/events": "get",
    "/generations/{generation_id}/events": "get",
}
# POSTs that take no body (Replicate's cancel).
POSTS_WITHOUT_BODY = {"/generations/{generation_id}/cancel"}
# Operation ids that are not the path's first segment.
OPERATION_IDS = {
    "/generations/{generation_id}": "generation_status",
    "/generations/{generation_id}/cancel": "generation_cancel",
    "/generations/{generation_id}/{index}.{extension}": "generation_image",
    "/sessions/{session_id}": "session_detail",
    "/sessions/{session_id}/images/{image_id}": "session_image",
    "/sessions/{session_id}/images": "session_images_upload",
    "/sessions/{session_id}/masks": "session_masks_create",
    "/sessions/{session_id}/captions": "session_captions_create",
    "/sessions/{session_id}/images/{image_id}/mask": "session_image_mask",
    "/sessions/{session_id}/loras/{lora_filename}": "lora_file",
    "/runs/{run_id}/events": "run_events",
    "/generations/{generation_id}/events": "generation_events",
}


def test_schema_is_valid_openapi_3(schema_document):
    assert schema_document["openapi"].startswith("3.")
    validate_schema(schema_document)  # raises on any violation of the OpenAPI 3 JSON schema


def test_schema_lists_the_nine_endpoints_and_the_additions_once(schema_document):
    assert set(schema_document["paths"]) == set(ENDPOINTS) | set(ADDITIONS)
    for path, method in {**ENDPOINTS, **ADDITIONS}.items():
        operation = schema_document["paths"][path][method]
        assert operation["operationId"] == OPERATION_IDS.get(path, path.strip("/").split("/")[0])
        assert "200" in operation["responses"]
        if method == "post" and path not in POSTS_WITHOUT_BODY:
            assert "requestBody" in operation, path
        if path in POSTS_WITHOUT_BODY:
            assert "requestBody" not in operation, path


def test_errors_are_documented_in_the_json_error_shape(schema_document):
    error = schema_document["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"status", "message"}
    for path, method in {**ENDPOINTS, **ADDITIONS}.items():
        if method != "post":
            continue
        responses = schema_document["paths"][path][method]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }


def test_request_and_response_bodies_are_described(schema_document):
    components = schema_document["components"]["schemas"]
    assert {"session_id", "image_base64", "prompt"} <= set(
        components["PostSessionImage"]["properties"]
    )
    assert "format" in components["GetLora"]["properties"]
    assert {option["$ref"].rsplit("/", 1)[1] for option in components["TrainStatus"]["oneOf"]} == {
        "TrainStatusInProgress",
        "TrainStatusCompleted",
        "TrainStatusError",
        "TrainStatusNone",
        "TrainStatusCancelled",
    }
    assert {"step", "total_steps", "loss", "eta_seconds", "stage"} <= set(
        components["TrainStatusInProgress"]["properties"]
    )
    assert {"images_base64", "seed", "lora", "duration_ms"} <= set(
        components["Txt2ImgResponse"]["properties"]
    )


def test_txt2img_scheduler_is_optional_with_its_names_as_enum(schema_document):
    body = schema_document["paths"]["/txt2img"]["post"]["requestBody"]["content"]
    ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    request = schema_document["components"]["schemas"][ref]
    scheduler = request["properties"]["scheduler"]
    assert "scheduler" not in request.get("required", [])
    enum = scheduler.get("enum") or next(
        schema_document["components"]["schemas"][option["$ref"].rsplit("/", 1)[1]]["enum"]
        for option in scheduler["oneOf"]
        if "$ref" in option
    )
    assert [name for name in enum if name] == [
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "dpmpp_sde_karras",
        "ddim",
        "unipc",
    ]


def test_txt2img_refiner_policy_and_switch_are_optional_with_enum_and_range(schema_document):
    body = schema_document["paths"]["/txt2img"]["post"]["requestBody"]["content"]
    ref = body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    request = schema_document["components"]["schemas"][ref]
    refiner, switch = request["properties"]["refiner"], request["properties"]["refiner_switch"]
    assert not {"refiner", "refiner_switch"} & set(request.get("required", []))
    enum = refiner.get("enum") or next(
        schema_document["components"]["schemas"][option["$ref"].rsplit("/", 1)[1]]["enum"]
        for option in refiner["oneOf"]
        if "$ref" in option
    )
    assert [name for name in enum if name] == ["ensemble", "none"]
    assert switch["type"] == "number" and switch.get("nullable") is True
    assert (switch["minimum"], switch["maximum"]) == (0.5, 0.99)


def test_txt2img_describes_loras_img2img_and_outputs(schema_document):
    schemas = schema_document["components"]["schemas"]
    body = schema_document["paths"]["/txt2img"]["post"]["requestBody"]["content"]
    request = schemas[body["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    properties = request["properties"]
    assert not {"loras", "init_image_base64", "strength", "output_format", "quality"} & set(
        request.get("required", [])
    )
    loras = properties["loras"]
    assert loras["type"] == "array" and loras["maxItems"] == 4
    item = schemas[loras["items"]["$ref"].rsplit("/", 1)[1]]
    assert set(item["properties"]) == {"session_id", "iteration", "lora_filename", "scale"}
    assert item["required"] == ["session_id"]
    assert (properties["strength"]["minimum"], properties["strength"]["maximum"]) == (0, 1)
    assert (properties["quality"]["minimum"], properties["quality"]["maximum"]) == (1, 100)
    for name in ("loras", "init_image_base64", "strength", "output_format", "quality"):
        assert properties[name].get("description"), name
    response = schemas["Txt2ImgResponse"]["properties"]
    assert {"seeds", "loras", "scheduler", "refiner", "refiner_switch", "strength"} <= set(response)
    assert response["seeds"]["items"]["type"] == "integer"


def test_schema_generation_has_no_warnings(tmp_path):
    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--file",
        str(tmp_path / "schema.yaml"),
        stderr=io.StringIO(),
    )
    assert "/cancel_training:" in (tmp_path / "schema.yaml").read_text()


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/api/docs", "/api/redoc"])
def test_documentation_pages_and_their_scripts_are_served_here(page):
    client = APIClient()
    response = client.get(page)
    assert response.status_code == 200 and b"/api/schema" in response.content
    html = response.content.decode()
    script = "swagger-ui-bundle.js" if page == "/api/docs" else "redoc.standalone.js"
    static = next(
        part.split('"')[0] for part in html.split('src="')[1:] if script in part.split('"')[0]
    )
    assert static.startswith("/static/drf_spectacular_sidecar/")
    assert client.get(static).status_code == 200


EXTERNAL_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""", re.IGNORECASE)


def _referenced_urls(html: str) -> list[str]:
    """Every URL the page loads or links: src= and href= attributes, plus any absolute URL
    written anywhere (inline scripts, styles, settings)."""
    attributes = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html, re.IGNORECASE)
    return attributes + EXTERNAL_URL.findall(html)


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["/api/docs", "/api/redoc"])
def test_documentation_pages_load_nothing_from_outside_the_service(page):
    client = APIClient()
    html = client.get(page).content.decode()
    urls = _referenced_urls(html)
    assert urls, "the page references its scripts"
    for url in urls:
        if url.startswith("//") or "://" in url:
            # Only the service's own origin (the test client's) may be written out in full.
            assert url.lower().startswith(("http://testserver/", "https://testserver/")), url
            continue
        if url.startswith("/"):
            assert client.get(url).status_code == 200, url  # served here, offline
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html


@pytest.mark.django_db
def test_swagger_ui_validator_badge_is_off_and_redoc_uses_system_fonts():
    client = APIClient()
    swagger = client.get("/api/docs").content.decode()
    # Swagger UI's default validatorUrl loads a badge from validator.swagger.io.
    assert '"validatorUrl": null' in swagger
    redoc = client.get("/api/redoc").content.decode()
    assert "system-ui" in redoc and "Montserrat" not in redoc
