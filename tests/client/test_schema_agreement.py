"""The client knows every field the API takes: a field added to /train_lora, /txt2img, a
/txt2img LoRA or the multipart upload fails here until sdxl_client/models.py names it.

Checked against the OpenAPI snapshot, which test_schema_unchanged.py holds equal to the
live /api/schema (so a change of the API updates the snapshot, then fails here)."""

import json

import pytest
from sdxl_client import SDXLClient
from sdxl_client.models import (
    GENERATION_FIELDS,
    LORA_FIELDS,
    TRAINING_FIELDS,
    UPLOAD_FIELDS,
    TrainingOptions,
)

from tests.sdxl_service.api.test_schema_unchanged import SNAPSHOT


def _fields(schema_name: str) -> set[str]:
    schemas = json.loads(SNAPSHOT.read_text(encoding="utf-8"))["components"]["schemas"]
    return set(schemas[schema_name]["properties"])


@pytest.mark.parametrize(
    ("schema_name", "known"),
    [
        ("TrainLora", TRAINING_FIELDS),
        ("Txt2Img", GENERATION_FIELDS),
        ("LoraChoice", LORA_FIELDS),
        ("SessionImagesUpload", UPLOAD_FIELDS),
    ],
)
def test_the_client_declares_exactly_the_api_fields(schema_name, known):
    assert set(known) == _fields(schema_name)


def test_the_typed_training_options_name_every_training_field():
    assert set(TrainingOptions.__annotations__) == set(TRAINING_FIELDS) - {"session_id"}


def test_the_snapshot_names_the_request_bodies_compared():
    document = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    bodies = {
        ("/train_lora", "application/json"): "TrainLora",
        ("/txt2img", "application/json"): "Txt2Img",
        ("/sessions/{session_id}/images", "multipart/form-data"): "SessionImagesUpload",
    }
    for (path, content_type), name in bodies.items():
        content = document["paths"][path]["post"]["requestBody"]["content"]
        assert content[content_type]["schema"]["$ref"] == f"#/components/schemas/{name}"


def test_an_unknown_field_is_refused_before_any_request():
    import httpx

    requests = []
    transport = httpx.MockTransport(lambda request: requests.append(request) or httpx.Response(500))
    with SDXLClient("http://api", transport=transport) as client:
        with pytest.raises(ValueError, match="stepz"):
            client.train(1, stepz=10)
        with pytest.raises(ValueError, match="cfg_scale"):
            client.generate("a cat", cfg_scale=7)
    assert requests == []
