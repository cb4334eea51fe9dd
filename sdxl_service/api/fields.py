"""Serializer fields shared by the API's request serializers.

DRF's own fields are lenient in ways a JSON API should not be: IntegerField takes 5.0 and
"5.0", FloatField takes true (as 1.0), CharField takes numbers. These fields close those
gaps, so a wrong type is a 400 naming the field.
"""

import base64
import binascii
import re
from typing import Any

from django.conf import settings
from django.core.validators import StepValueValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from sdxl_engine.parameters import IMAGE_SIDE_MIN, IMAGE_SIDE_MULTIPLE, SEED_BITS
from sdxl_service.api.field_aliases import printable

_DATA_URL_PREFIX = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# ASCII digits only: str.isdigit() also takes "²", which int() refuses; 19 digits hold
# any 64-bit id, and a bound keeps int() away from its 4300-digit limit.
_SESSION_ID_TEXT = re.compile(r"[0-9]{1,19}")
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,30}")


@extend_schema_field(
    {
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
            # Ids start at 1: "0" (or "000") is refused like 0.
            {"type": "string", "pattern": "^0*[1-9][0-9]*$", "minLength": 1, "maxLength": 19},
        ],
        "example": "1",
    }
)
class SessionIdField(serializers.Field[int, int | str, str, Any]):
    """`session_id` arrives as a string ("1") or an integer (1): both are accepted."""

    default_error_messages = {"invalid": "must be a positive integer or a string of digits"}

    def to_internal_value(self, data: int | str) -> int:
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, int):
            value = data
        elif isinstance(data, str) and _SESSION_ID_TEXT.fullmatch(data.strip()):
            value = int(data.strip())
        else:
            self.fail("invalid")
        if value < 1 or value > 2**63 - 1:
            self.fail("invalid")
        return value

    def to_representation(self, value: int) -> str:
        return str(value)


class StrictIntegerField(serializers.IntegerField):
    """An integer, or a string of digits; never a boolean or a float (DRF takes 5.0 as 5)."""

    def to_internal_value(self, data: float | int | str) -> int:
        if isinstance(data, bool | float):
            self.fail("invalid")
        if isinstance(data, str) and not _INTEGER_TEXT.fullmatch(data.strip()):
            self.fail("invalid")
        return super().to_internal_value(data)


# The largest number a query parameter takes where its field names no smaller bound: far
# below the 64-bit integers SQLite and PostgreSQL store, so that `offset + limit` cannot
# overflow them either (an unbounded ?offset=99999999999999999999 reached the database).
MAX_QUERY_INTEGER = 1_000_000_000


class QueryIntegerField(StrictIntegerField):
    """An integer query parameter: never negative, never above MAX_QUERY_INTEGER unless the
    field names its own bounds, so that each is a 400 naming it and the schema shows both."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", MAX_QUERY_INTEGER)
        super().__init__(**kwargs)


class StrictFloatField(serializers.FloatField):
    """A finite number (or a string of one); never a boolean (DRF takes true as 1.0)."""

    def to_internal_value(self, data: float | int | str) -> float:
        if isinstance(data, bool):
            self.fail("invalid")
        return super().to_internal_value(data)


class StringField(serializers.CharField):
    """A JSON string: DRF's CharField also takes numbers and booleans (7 becomes "7").

    DRF itself refuses NUL and lone surrogates ("\\ud800" in JSON), which no caption
    file or PostgreSQL column could store.
    """

    default_error_messages = {"not_a_string": "must be a string"}

    def to_internal_value(self, data: str) -> str:
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


@extend_schema_field({"type": "string", "format": "byte"})
class Base64BytesField(serializers.CharField):
    """Base64 text (optionally a `data:...;base64,` URL) decoded to bytes, strictly."""

    default_error_messages = {"invalid_base64": "is not valid base64"}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", True)
        super().__init__(**kwargs)

    # Decodes to bytes where CharField (its text checks reused) gives str.
    def to_internal_value(self, data: str) -> bytes:  # type: ignore[override]
        text = super().to_internal_value(data)
        text = _WHITESPACE.sub("", _DATA_URL_PREFIX.sub("", text, count=1))
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.fail("invalid_base64")
        if not decoded:
            self.fail("invalid_base64")
        return decoded


# The keyword arguments of an optional seed field.
SEED: dict[str, Any] = {
    "min_value": 0,
    "max_value": 2**SEED_BITS - 1,
    "required": False,
    "allow_null": True,
}


class MultipleOf(StepValueValidator):
    """Django's StepValueValidator with the API's message; the schema shows it as
    `multipleOf` (schema.AutoSchema)."""

    message = "must be a multiple of %(limit_value)s"


def largest_image_side(divisor: int) -> int:
    """The largest side a request may give: SDXL_MAX_IMAGE_SIDE rounded down to a multiple
    of `divisor` (with SDXL_MAX_IMAGE_SIDE 100, height 100 is refused: 96 is the largest)."""
    side: int = settings.SDXL_MAX_IMAGE_SIDE // divisor * divisor
    return side


def image_side(divisor: int = IMAGE_SIDE_MULTIPLE, **kwargs: Any) -> serializers.IntegerField:
    return StrictIntegerField(
        min_value=IMAGE_SIDE_MIN,
        max_value=largest_image_side(divisor),
        validators=[MultipleOf(divisor)],
        **kwargs,
    )


class ChoiceField(serializers.ChoiceField):
    """DRF's ChoiceField whose refusal lists the valid values, and that takes other names
    for a choice (`aliases`: {"jpg": "jpeg"})."""

    default_error_messages = {
        "invalid_choice": '"{input}" is not a valid choice; must be one of: {valid}'
    }

    def __init__(self, *, aliases: dict[str, str] | None = None, **kwargs: Any) -> None:
        self.aliases = aliases or {}
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if data == "" and self.allow_blank:
            return ""
        if isinstance(data, str) and data not in self.choice_strings_to_values:
            data = self.aliases.get(data, data)
        try:
            return self.choice_strings_to_values[str(data)]
        except KeyError:
            self.fail(
                "invalid_choice",
                input=printable(str(data)),
                valid=", ".join(str(choice) for choice in self.choice_strings_to_values),
            )
