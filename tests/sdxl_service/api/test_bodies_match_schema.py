"""Every body the API answers validates against the OpenAPI description at /api/schema.

The schema is fetched the way a client generator fetches it; the bodies are real answers
of every endpoint, in every shape (the five /train_status shapes, LoRA or none, both LoRA
formats, the error shape of each documented code).
"""

import json

import pytest
from openapi_schema_validator import OAS30Validator
from rest_framework.test import APIClient

from tests.helpers import b64, image_bytes, lora_bytes
from training_app.services import runs as run_services

pytestmark = pytest.mark.django_db
TRAIN = {"steps": 1, "resolution": 64, "batch_size": 1, "seed": 1}
# Two steps that keep a sample of each step and a checkpoint at step 1.
WATCHED = {**TRAIN, "steps": 2, "sample_every": 1, "checkpoint_every": 1}
TXT2IMG = {"prompt": "a red square", "height": 64, "width": 64, "steps": 5, "seed": 3}


class SchemaChecker:
    """Checks answers against the response schemas of the fetched OpenAPI document."""

    def __init__(self, document: dict):
        self.document = document
        self.checked: set[tuple[str, int]] = set()

    def operation(self, path: str, method: str | None = None) -> dict:
        """The path's operation for `method`; without one, the path's only operation."""
        operations = self.document["paths"][path]
        if method is not None:
            return operations[method.lower()]
        (operation,) = operations.values()
        return operation

    def response_schema(self, path: str, status: int, method: str | None = None) -> dict:
        documented = self.operation(path, method)["responses"]
        assert str(status) in documented, f"{path} answered {status}, which it does not document"
        schema = documented[str(status)]["content"]["application/json"]["schema"]
        # References ("#/components/...") resolve against the document's components.
        return {**schema, "components": self.document["components"]}

    def errors(self, path: str, status: int, body, method: str | None = None) -> list[str]:
        validator = OAS30Validator(self.response_schema(path, status, method))
        return [error.message for error in validator.iter_errors(body)]

    def check_image(self, path: str, response, media_type: str = "image/png") -> None:
        """An image answer: the documented status and content type, and a real image."""
        operation = self.operation(path, response.request["REQUEST_METHOD"])
        assert media_type in operation["responses"][str(response.status_code)]["content"]
        assert response["Content-Type"] == media_type
        data = b"".join(response.streaming_content) if response.streaming else response.content
        assert data.startswith(
            {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8"}[media_type]
        )
        self.checked.add((path, response.status_code))

    def check_download(self, path: str, response) -> None:
        """A file download: the documented status and content type, a safetensors file."""
        (operation,) = self.document["paths"][path].values()
        media_type = "application/octet-stream"
        assert media_type in operation["responses"][str(response.status_code)]["content"]
        assert response["Content-Type"] == media_type
        data = b"".join(response.streaming_content)
        header_length = int.from_bytes(data[:8], "little")
        assert json.loads(data[8 : 8 + header_length])
        self.checked.add((path, response.status_code))

    def check_event_stream(self, path: str, response) -> list[tuple[str, dict]]:
        """An event stream (Django's own server: it ends with its subject's terminal
        event): the documented status and content type; its (event, data) pairs."""
        operation = self.operation(path, "GET")
        assert "text/event-stream" in operation["responses"][str(response.status_code)]["content"]
        assert response["Content-Type"] == "text/event-stream"
        text = b"".join(response.streaming_content).decode()
        blocks = [block.split("\n") for block in text.split("\n\n") if block]
        events = [(block[1].removeprefix("event: "), json.loads(block[2][6:])) for block in blocks]
        assert all(data["event"] == name for name, data in events)
        self.checked.add((path, response.status_code))
        return events

    def check(self, path: str, response) -> dict:
        body = response.json()
        method = response.request["REQUEST_METHOD"]
        assert self.errors(path, response.status_code, body, method) == [], (path, body)
        self.checked.add((path, response.status_code))
        return body


@pytest.fixture
def schema(schema_document) -> SchemaChecker:
    return SchemaChecker(schema_document)


@pytest.fixture
def api(schema):
    """POSTs (or GETs) a body and checks the answer against the schema."""
    client = APIClient()

    def call(
        path: str, body: dict | None = None, expect: int = 200, template: str | None = None
    ) -> dict:
        """`template`: the schema's path for a path with parameters (`/sessions/{session_id}`)."""
        if body is None:
            response = client.get(path)
        else:
            response = client.post(path, body, format="json")
        assert response.status_code == expect, response.content
        return schema.check(template or path, response)

    return call


def test_the_checker_catches_a_body_that_drifted_from_the_schema(schema):
    assert schema.errors("/create_session", 200, {"session_id": 1}) == []
    assert schema.errors("/create_session", 200, {"session_id": "1"})  # a string, not an int
    assert schema.errors("/train_status", 200, {"status": "none", "progress": 0}) == []
    assert schema.errors("/train_status", 200, {"status": "completed", "progress": 0})
    assert schema.errors("/txt2img", 200, {"images_base64": [], "seed": 1, "lora": None})


def test_every_endpoint_answers_bodies_its_schema_describes(api, schema, generations_in_process):
    session_id = api("/create_session")["session_id"]
    ref = {"session_id": str(session_id)}
    for color in ("red", "blue"):
        image = {"image_base64": b64(image_bytes(color=color)), "prompt": color}
        api("/post_session_image", {**ref, **image})
    assert api("/train_status", ref)["status"] == "none"
    assert api("/list_sessions")["sessions"][0]["training"]["status"] == "none"

    api("/train_lora", {**ref, **TRAIN})
    assert api("/train_status", ref)["status"] == "in-progress"
    assert api("/list_sessions")["sessions"][0]["training"]["status"] == "in-progress"
    api("/cancel_training", ref)
    assert api("/train_status", ref)["status"] == "cancelled"
    assert api("/list_sessions")["sessions"][0]["training"]["status"] == "cancelled"

    run_id = api("/train_lora", {**ref, **WATCHED})["run_id"]
    run_services.training_run_execute(run_id)  # the training worker's part, in-process
    completed = api("/train_status", ref)
    assert completed["status"] == "completed"
    assert [sample["step"] for sample in completed["samples"]] == [1, 1, 2, 2]  # 2 prompts
    # The checkpoint, then the final LoRA, each scored; the tiny preset's random embedder
    # rates their samples (meaninglessly).
    assert [checkpoint["step"] for checkpoint in completed["checkpoints"]] == [1, 2]
    assert completed["checkpoints"][1]["lora_filename"] == "lora_1.safetensors"
    assert all(isinstance(entry["eval_loss"], float) for entry in completed["checkpoints"])
    assert all(-1 <= entry["similarity"] <= 1 for entry in completed["checkpoints"])
    assert completed["best_checkpoint"]["eval_loss"] == min(
        entry["eval_loss"] for entry in completed["checkpoints"]
    )
    assert [point["step"] for point in completed["loss_history"]] == [1, 2]
    run_events = schema.check_event_stream(
        "/runs/{run_id}/events", APIClient().get(f"/runs/{run_id}/events")
    )
    assert run_events[0][0] == "started" and run_events[-1][0] == "completed"
    assert run_events[-1][1]["data"]["status"] == "completed"
    assert api("/list_sessions")["sessions"][0]["latest_lora"] == "lora_1.safetensors"
    schema.check_image(
        "/training_samples/{sample_id}.png", APIClient().get(completed["samples"][0]["url"])
    )
    checkpoint = {**ref, "lora_filename": completed["checkpoints"][0]["lora_filename"]}
    assert api("/get_lora", checkpoint)["iteration"] is None

    for lora_format in ("diffusers", "kohya"):
        got = api("/get_lora", {**ref, "format": lora_format})
        assert got["format"] == lora_format
        schema.check_download(
            "/sessions/{session_id}/loras/{lora_filename}", APIClient().get(got["lora_url"])
        )
    uploaded = api("/upload_lora", {**ref, "lora_base64": b64(lora_bytes())})
    assert api("/get_lora", {**ref, "iteration": uploaded["iteration"]})["iteration"] == 2

    assert api("/txt2img", TXT2IMG)["lora"] is None
    with_lora = api("/txt2img", {**TXT2IMG, "use_lora": True, **ref})
    assert with_lora["lora"]["filename"] == "lora_2.safetensors"
    from_checkpoint = api("/txt2img", {**TXT2IMG, "use_lora": True, **checkpoint})
    assert from_checkpoint["lora"]["filename"] == checkpoint["lora_filename"]

    queued = api("/txt2img", {**TXT2IMG, "async": True}, expect=202)
    status = api(queued["status_url"], template="/generations/{generation_id}")
    assert status["status"] == "queued"
    cancel = f"/generations/{queued['generation_id']}/cancel"
    cancelled = api(cancel, {}, template="/generations/{generation_id}/cancel")
    assert cancelled["status"] == "cancelled"
    generation_events = schema.check_event_stream(
        "/generations/{generation_id}/events",
        APIClient().get(f"/generations/{queued['generation_id']}/events"),
    )
    assert [name for name, _ in generation_events] == ["cancelled"]
    jpeg = api("/txt2img", {**TXT2IMG, "response_format": "url", "output_format": "jpeg"})
    schema.check_image(
        "/generations/{generation_id}/{index}.{extension}",
        APIClient().get(jpeg["image_urls"][0]),
        "image/jpeg",
    )
    detail = api(f"/sessions/{session_id}", template="/sessions/{session_id}")
    assert len(detail["images"]) == 2 and detail["loras"] and detail["runs"]
    schema.check_image(
        "/sessions/{session_id}/images/{image_id}", APIClient().get(detail["images"][0]["url"])
    )
    from django.core.files.uploadedfile import SimpleUploadedFile

    uploaded = APIClient().post(
        f"/sessions/{session_id}/images",
        {"image": [SimpleUploadedFile("a.png", image_bytes())], "caption": ["a"]},
        format="multipart",
    )
    assert schema.check("/sessions/{session_id}/images", uploaded)["status"] == "success"
    image_path = "/sessions/{session_id}/images/{image_id}"
    image_url = uploaded.json()["images"][0]["url"]
    patched = APIClient().patch(image_url, {"caption": "b"}, format="json")
    assert schema.check(image_path, patched)["caption"] == "b"
    mask_path, mask_url = f"{image_path}/mask", f"{image_url}/mask"
    white = {"mask_base64": b64(image_bytes(color="white"))}
    masked = APIClient().put(mask_url, white, format="json")
    assert schema.check(mask_path, masked)["mask_url"] == mask_url
    schema.check_image(mask_path, APIClient().get(mask_url))
    assert schema.check(mask_path, APIClient().delete(mask_url))["mask_url"] is None
    assert schema.check(image_path, APIClient().delete(image_url))["status"] == "deleted"
    masks_path = "/sessions/{session_id}/masks"
    masks = api(f"/sessions/{session_id}/masks", {"kind": "subject"}, template=masks_path)
    assert masks["kind"] == "subject" and len(masks["images"]) == 2
    captions_path = "/sessions/{session_id}/captions"
    captioned = api(f"/sessions/{session_id}/captions", {"overwrite": True}, template=captions_path)
    assert captioned["captioned"] == 2 and captioned["images"][0]["written"] is True
    paged = api("/list_sessions?limit=1", template="/list_sessions")
    assert paged["count"] == 1 and paged["next_offset"] is None

    assert api("/delete_session", ref)["status"] == "deleted"
    assert api("/healthz")["checks"]["generation_worker"]["ok"] is True
    assert {path for path, _ in schema.checked} == set(schema.document["paths"])


def test_error_bodies_match_the_error_shape_of_each_documented_code(api, settings):
    unknown = {"session_id": "999"}
    api("/train_status", {"session_id": "x"}, expect=400)
    api("/train_status", unknown, expect=404)
    api("/get_lora", unknown, expect=404)
    api("/delete_session", unknown, expect=404)
    session_id = api("/create_session")["session_id"]
    api("/cancel_training", {"session_id": session_id}, expect=409)
    api("/txt2img", TXT2IMG, expect=503)  # no generation worker
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    big = {"session_id": session_id, "image_base64": "A" * 4096, "prompt": "x"}
    api("/post_session_image", big, expect=413)
