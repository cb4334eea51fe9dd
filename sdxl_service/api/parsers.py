"""The API's request parser."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser, with JSON nested too deep for Python's parser answering 400.

    `[[[[...]]]]` a few thousand levels deep raises RecursionError, which DRF does not take
    for a parse error (it catches ValueError), so the request would end in a 500.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
