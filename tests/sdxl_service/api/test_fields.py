import pytest
from rest_framework import serializers

from sdxl_service.api.fields import (
    Base64BytesField,
    SessionIdField,
    StrictFloatField,
    StrictIntegerField,
    StringField,
)


def _accepts(field: serializers.Field, value):
    return field.run_validation(value)


def _refuses(field: serializers.Field, value) -> None:
    with pytest.raises(serializers.ValidationError):
        field.run_validation(value)


@pytest.mark.parametrize("value", [True, False, 5.0, 5.5, "5.0", "five", "", [5], {"n": 5}, None])
def test_strict_integer_refuses_what_is_not_an_integer(value):
    _refuses(StrictIntegerField(), value)


@pytest.mark.parametrize(("value", "expected"), [(5, 5), ("5", 5), (" -3 ", -3), (0, 0)])
def test_strict_integer_takes_integers_and_strings_of_digits(value, expected):
    assert _accepts(StrictIntegerField(), value) == expected


@pytest.mark.parametrize(
    "value", [True, False, "nan", "inf", "-inf", "1e400", 10**400, "loud", [1.0], None]
)
def test_strict_float_refuses_booleans_and_non_finite_numbers(value):
    _refuses(StrictFloatField(), value)


@pytest.mark.parametrize(("value", "expected"), [(7, 7.0), (7.5, 7.5), ("0.25", 0.25)])
def test_strict_float_takes_numbers(value, expected):
    assert _accepts(StrictFloatField(), value) == expected


@pytest.mark.parametrize(
    "value", ["\ud800", "a\udfffb", "nul\x00here", "", "   ", 7, 1.5, True, ["a"]]
)
def test_string_field_refuses_what_cannot_be_stored(value):
    _refuses(StringField(), value)


def test_string_field_takes_any_real_unicode():
    assert _accepts(StringField(), "un chat 🐱 über 東京") == "un chat 🐱 über 東京"


@pytest.mark.parametrize(
    "value", ["²", "١", "0", "-1", "1.0", "9" * 20, "9" * 5000, True, 1.0, 2**63, None, [1]]
)
def test_session_id_refuses_anything_but_a_positive_ascii_integer(value):
    _refuses(SessionIdField(), value)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("1", 1), (" 42 ", 42)])
def test_session_id_takes_integers_and_digit_strings(value, expected):
    assert _accepts(SessionIdField(), value) == expected


@pytest.mark.parametrize(
    "value",
    ["@@@", "abc", "YWJ", "é", "\ud800", "data:image/png;base64,", "", 123, None, ["YQ=="]],
)
def test_base64_refuses_malformed_text(value):
    _refuses(Base64BytesField(), value)


@pytest.mark.parametrize(
    "value",
    ["YWJj", " YW\nJj ", "data:image/png;base64,YWJj", "DATA:application/octet;base64,YWJj"],
)
def test_base64_takes_plain_wrapped_and_data_url_text(value):
    assert _accepts(Base64BytesField(), value) == b"abc"


# Through the API: a choice refused lists the valid values; jpg is jpeg (issue 25).
@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/get_lora",
            {"session_id": 1, "format": "safetensors"},
            'format: "safetensors" is not a valid choice; must be one of: diffusers, kohya',
        ),
        (
            "/txt2img",
            {"prompt": "x", "output_format": "gif"},
            'output_format: "gif" is not a valid choice; must be one of: png, jpeg, webp',
        ),
        (
            "/txt2img",
            {"prompt": "x", "response_format": "json"},
            'response_format: "json" is not a valid choice; must be one of: base64, url',
        ),
        (
            "/train_lora",
            {"session_id": 1, "recipe": "fast"},
            'recipe: "fast" is not a valid choice; must be one of: service, original',
        ),
        (
            "/train_lora",
            {"session_id": 1, "lr_scheduler": "linear"},
            'lr_scheduler: "linear" is not a valid choice; must be one of: constant,',
        ),
        (
            "/train_lora",
            {"session_id": 1, "webhook_events": ["done"]},
            'webhook_events[0]: "done" is not a valid choice; must be one of: started, progress,',
        ),
    ],
)
def test_a_refused_choice_lists_the_valid_values(path, body, message):
    from rest_framework.test import APIClient

    from tests.sdxl_service.api.test_session_views import assert_error

    assert_error(APIClient().post(path, body, format="json"), 400, message)


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["jpg", "jpeg"])
def test_txt2img_takes_jpg_for_jpeg(name, generations_in_process):
    from rest_framework.test import APIClient

    api = APIClient()
    body = {"prompt": "x", "height": 64, "width": 64, "steps": 5, "response_format": "url"}

    answer = api.post("/txt2img", {**body, "output_format": name}, format="json")

    assert answer.status_code == 200, answer.content
    assert answer.json()["output_format"] == "jpeg"
    (url,) = answer.json()["image_urls"]
    assert url.endswith("/0.jpg")
    image = api.get(url)
    assert image["Content-Type"] == "image/jpeg"
    assert b"".join(image.streaming_content)[:3] == b"\xff\xd8\xff"


def test_choice_field_aliases_and_blank():
    from sdxl_service.api.fields import ChoiceField

    field = ChoiceField(choices=["png", "jpeg"], aliases={"jpg": "jpeg"})
    assert _accepts(field, "jpg") == "jpeg"
    assert _accepts(field, "png") == "png"
    with pytest.raises(serializers.ValidationError) as refused:
        field.run_validation("JPG")
    assert refused.value.detail == ['"JPG" is not a valid choice; must be one of: png, jpeg']
    with pytest.raises(serializers.ValidationError) as surrogate:
        field.run_validation("a\udfffb")
    assert surrogate.value.detail == [
        '"a\\udfffb" is not a valid choice; must be one of: png, jpeg'
    ]
