"""Serializer fields shared by the API's request serializers."""

import base64
import binascii
import re

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

_DATA_URL_PREFIX = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@extend_schema_field(
    {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": "^[0-9]+$"},
        ],
        "example": "1",
    }
)
class SessionIdField(serializers.Field):
    """`session_id` arrives as a string ("1") or an integer (1): both are accepted."""

    default_error_messages = {"invalid": "must be a positive integer or a string of digits"}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, int):
            value = data
        elif isinstance(data, str) and data.strip().isdigit():
            value = int(data.strip())
        else:
            self.fail("invalid")
        if value < 1 or value > 2**63 - 1:
            self.fail("invalid")
        return value

    def to_representation(self, value):
        return str(value)


@extend_schema_field({"type": "string", "format": "byte"})
class Base64BytesField(serializers.CharField):
    """Base64 text (optionally a `data:...;base64,` URL) decoded to bytes, strictly."""

    default_error_messages = {"invalid_base64": "is not valid base64"}

    def __init__(self, **kwargs):
        kwargs.setdefault("trim_whitespace", True)
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        text = super().to_internal_value(data)
        text = _WHITESPACE.sub("", _DATA_URL_PREFIX.sub("", text, count=1))
        try:
            decoded = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.fail("invalid_base64")
        if not decoded:
            self.fail("invalid_base64")
        return decoded
