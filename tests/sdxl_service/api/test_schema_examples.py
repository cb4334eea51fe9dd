"""The example bodies Swagger UI builds from the schema are valid requests.

Swagger UI fills a request body from the schema alone. Its rule, as swagger-ui-dist's
sampler applies it (checked against the bundled swagger-ui-bundle.js) and as
`swagger_example` below repeats it: a property's `example`, else its `default`, else the
first `oneOf` option's value, else an enum's first value, else by type: an object has every
property, an array one item, a number its `maximum` (else `minimum`, else 0), a string
"string", a boolean true. JavaScript holds integers exactly only up to 2**53, so a
64-bit maximum (seeds) would reach the API rounded up past it.
"""

import pytest

from sdxl_service.api.generation.serializers import Txt2ImgSerializer
from sdxl_service.api.schema import JS_SAFE_INTEGER, safe_integer_example


def _resolve(schema: dict, document: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def swagger_example(schema: dict, document: dict):
    schema = _resolve(schema, document)
    if "example" in schema:
        return schema["example"]
    if "default" in schema:
        return schema["default"]
    if schema.get("oneOf"):
        return swagger_example(schema["oneOf"][0], document)
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "object":
        return {
            name: swagger_example(prop, document)
            for name, prop in schema.get("properties", {}).items()
            if not _resolve(prop, document).get("readOnly")
        }
    if kind == "array":
        return [swagger_example(schema.get("items", {}), document)]
    if kind in ("integer", "number"):
        return schema.get("maximum", schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return "string"


def _integers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _integers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _integers(item)


def _request_examples(document: dict) -> dict[str, object]:
    """Each request body's example, of its first media type (JSON where there is one)."""
    return {
        path: swagger_example(
            next(iter(operation["requestBody"]["content"].values()))["schema"], document
        )
        for path, methods in document["paths"].items()
        for operation in methods.values()
        if "requestBody" in operation
    }


def test_every_integer_of_every_example_body_is_exact_in_javascript(schema_document):
    examples = _request_examples(schema_document)
    assert "/txt2img" in examples and "/train_lora" in examples
    for path, body in examples.items():
        for number in _integers(body):
            assert abs(number) <= 2**53, (path, number)


def test_request_seeds_are_left_out_in_the_examples(schema_document):
    """A request's seed example is null: a random seed, as the API documents, not one
    fixed seed that gives every "Try it out" the same image."""
    schemas = schema_document["components"]["schemas"]
    assert schemas["Txt2Img"]["properties"]["seed"]["maximum"] == 2**63 - 1
    assert schemas["Txt2Img"]["properties"]["seed"]["example"] is None
    assert schemas["TrainLora"]["properties"]["seed"]["example"] is None
    assert schemas["TrainLora"]["properties"]["sample_seed"]["example"] is None


@pytest.mark.django_db
def test_the_txt2img_example_body_is_a_valid_request(schema_document):
    body = _request_examples(schema_document)["/txt2img"]
    serializer = Txt2ImgSerializer(data=body)
    assert serializer.is_valid(), (body, serializer.errors)
    # Optional fields without a default are shown as left out (null), not as a fake image.
    assert body["init_image_base64"] is None and body["strength"] is None
    assert body["loras"] == []
    assert body["seed"] is None and serializer.validated_data["seed"] is None


@pytest.mark.parametrize(
    ("schema", "example"),
    [
        ({"minimum": 0, "maximum": 2**63 - 1}, 0),
        ({"minimum": 5, "maximum": 2**63 - 1}, 5),
        ({"minimum": -(2**63), "maximum": 2**63 - 1}, 0),
        ({"minimum": -(2**63), "maximum": -10}, -10),
        ({"maximum": 2**64}, 0),
    ],
)
def test_safe_integer_example_is_small_and_in_range(schema, example):
    assert safe_integer_example(schema) == example
    assert abs(example) <= JS_SAFE_INTEGER


@pytest.mark.django_db
def test_the_txt2img_example_body_sent_twice_draws_two_random_seeds(
    schema_document, generation_worker
):
    """Issue 25: Swagger UI's "Try it out" body for /txt2img asks for a random seed."""
    from rest_framework.test import APIClient

    api = APIClient()
    body = {**_request_examples(schema_document)["/txt2img"], "async": True}

    answers = [api.post("/txt2img", body, format="json") for _ in range(2)]

    assert [answer.status_code for answer in answers] == [202, 202]
    seeds = [api.get(answer.json()["status_url"]).json()["seeds"][0] for answer in answers]
    assert seeds[0] != seeds[1]
