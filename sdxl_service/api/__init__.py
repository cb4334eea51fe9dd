"""The HTTP API (docs/api.md): routes, views, request and response serializers, the strict
fields they use, the JSON parser, the one error handler and the OpenAPI helpers."""
