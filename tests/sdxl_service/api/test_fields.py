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
