"""What the endpoints' OpenAPI descriptions share: the error shape and its meanings, and
the rules the serializers enforce that drf-spectacular would leave out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.core.validators import StepValueValidator
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.utils import Direction, OpenApiResponse
from rest_framework import serializers

from sdxl_service.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, VIEW_FLAG

if TYPE_CHECKING:
    from drf_spectacular.generators import SchemaGenerator
    from rest_framework.request import Request


class ErrorSerializer(serializers.Serializer[Any]):
    """The one error shape of docs/api.md, whatever went wrong."""

    status = serializers.ChoiceField(choices=["error"])
    message = serializers.CharField(help_text="what went wrong, for a person")


_ERROR_MEANINGS = {
    400: "bad input (the message names the field)",
    404: "unknown session or LoRA",
    409: "conflicting state (already training, name taken, nothing to cancel)",
    413: "request body larger than the configured limit",
    429: "an owner's quota is used up, or the generation queue is full (the message names "
    "it; Retry-After when waiting helps); nothing was written",
    422: "the Idempotency-Key was used with another request (another endpoint or other parameters)",
    500: "the job failed (the message says why)",
    503: "no generation worker is running; or, with Retry-After, the job queue (the broker) "
    "cannot be reached (nothing was recorded) or the database is busy",
    504: "timed out waiting for the image",
}
# What any endpoint may answer, added to every operation by schema_with_common_errors.
_COMMON_ERRORS = {
    401: "an API token exists and the request has no valid `Authorization: Bearer <token>` "
    "(with WWW-Authenticate)",
    405: "the endpoint does not take this HTTP method",
    503: "the database is busy (locked by another writer, or out of connections) for longer "
    "than SDXL_WEB_DB_LOCK_TIMEOUT: retry after the Retry-After header's seconds",
}
# ... to every operation that takes a request body,
_BODY_ERRORS = {415: "the request body's Content-Type is not one the endpoint takes"}
# ... and to every operation that writes.
_WRITE_ERRORS = {
    507: "no space left on the device that holds the data dir or the database",
}
_WRITING_GETS = {"create_session"}


def error_responses(*codes: int, with_body: bool = True) -> dict[int, OpenApiResponse]:
    """The documented error answers of an endpoint: 400 and 413 for one that reads a
    request (`with_body`), plus `codes` (schema_with_common_errors adds the answers every
    endpoint may give)."""
    always = {400, 413} if with_body else set()
    return {
        code: OpenApiResponse(ErrorSerializer, description=_ERROR_MEANINGS[code])
        for code in sorted({*always, *codes})
    }


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's AutoSchema, showing two rules the serializers enforce:

    - `multipleOf` from a StepValueValidator (image sides: multiples of 8, training
      resolution: of 64);
    - `minLength: 1` on request strings that may not be blank (DRF's CharField refuses ""
      unless allow_blank, but drf-spectacular leaves that out).

    drf-spectacular leaves the methods extended here unannotated, hence the ignores.
    """

    def _map_serializer_field(
        self,
        field: serializers.Field[Any, Any, Any, Any],
        direction: str,
        bypass_extensions: bool = False,
    ) -> Any:
        schema = super()._map_serializer_field(  # type: ignore[no-untyped-call]
            field, direction, bypass_extensions
        )
        if (
            direction == "request"
            and isinstance(field, serializers.CharField)
            and not field.allow_blank
            and isinstance(schema, dict)
            and schema.get("type") == "string"
        ):
            schema.setdefault("minLength", 1)
        return schema

    def _insert_field_validators(
        self, field: serializers.Field[Any, Any, Any, Any], schema: dict[str, Any]
    ) -> None:
        super()._insert_field_validators(field, schema)  # type: ignore[no-untyped-call]
        for validator in field.validators:
            if isinstance(validator, StepValueValidator) and schema.get("type") == "integer":
                schema["multipleOf"] = validator.limit_value


class ScopedAutoSchema(AutoSchema):
    """Each operation that needs a token scope (access_app.permissions.scope_required)
    says which, and documents the 401 and 403 it may answer (the 429 of a quota only the
    endpoints that create something list, with their other errors)."""

    def _required_scope(self) -> str | None:
        for permission in self.view.get_permissions():
            scope: str | None = getattr(permission, "required_scope", None)
            if scope is not None:
                return scope
        return None

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        # Here rather than in get_description, which @extend_schema(description=) replaces.
        operation: dict[str, Any] | None = super().get_operation(*args, **kwargs)
        scope = self._required_scope()
        if operation is None or scope is None:
            return operation
        needs = (
            f"Token scope: `{scope}` (or `admin`) once API tokens are configured. Answers "
            "only for the caller's own sessions and generations (another owner's is a 404)."
        )
        description = operation.get("description")
        operation["description"] = f"{description}\n\n{needs}" if description else needs
        return operation

    def get_override_parameters(self) -> list[Any]:
        # Extended rather than replaced: @extend_schema(parameters=) adds to these.
        parameters: list[Any] = super().get_override_parameters()
        if getattr(self.view, VIEW_FLAG, False):
            parameters = [*parameters, IDEMPOTENCY_KEY_PARAMETER]
        return parameters

    def _get_response_bodies(self, direction: Direction = "response") -> dict[str, Any]:
        # Here rather than in get_response_serializers, which @extend_schema replaces.
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        added: dict[str, str] = {}
        if self._required_scope() is not None:
            added |= {
                "401": "no valid API token (tokens are configured)",
                "403": "the token lacks this endpoint's scope (the message names it)",
            }
        if getattr(self.view, VIEW_FLAG, False):
            added |= {
                "409": "a request with the same Idempotency-Key is still being answered",
                "422": _ERROR_MEANINGS[422],
            }
        if not added:
            return responses
        for code, meaning in added.items():
            error = OpenApiResponse(ErrorSerializer, description=meaning)
            # drf-spectacular leaves _get_response_for_code unannotated.
            response = self._get_response_for_code(error, code)  # type: ignore[no-untyped-call]
            responses.setdefault(code, response)
        return dict(sorted(responses.items()))


def schema_without_slashed_duplicates(
    endpoints: list[tuple[str, str, str, Any]], **kwargs: Any
) -> list[tuple[str, str, str, Any]]:
    """drf-spectacular preprocessing hook: `/x/` is the same endpoint as `/x` (api.urls)."""
    return [endpoint for endpoint in endpoints if not endpoint[0].endswith("/")]


# JavaScript numbers hold integers exactly only up to 2**53: Swagger UI would turn an example
# of 2**63 - 1 into 9223372036854775808, which the API refuses.
JS_SAFE_INTEGER = 2**53 - 1


def safe_integer_example(schema: dict[str, Any]) -> int:
    """A small example inside the schema's range: its minimum when that is safe, else 0
    (moved to the maximum when 0 is above it)."""
    minimum: int | None = schema.get("minimum")
    maximum: int | None = schema.get("maximum")
    if minimum is not None and abs(minimum) <= JS_SAFE_INTEGER:
        return minimum
    if maximum is not None and maximum < 0:
        return maximum
    return 0


def _with_safe_integer_examples(node: object) -> None:
    if isinstance(node, list):
        for item in node:
            _with_safe_integer_examples(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer" and "example" not in node:
        bounds = [node.get(key) for key in ("minimum", "maximum")]
        if any(bound is not None and abs(bound) > JS_SAFE_INTEGER for bound in bounds):
            node["example"] = safe_integer_example(node)
    for value in node.values():
        _with_safe_integer_examples(value)


def _referenced(node: object, found: set[str]) -> None:
    """The component names `node` refers to ("#/components/schemas/<name>")."""
    if isinstance(node, list):
        for item in node:
            _referenced(item, found)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _referenced(value, found)


def _request_components(result: dict[str, Any]) -> set[str]:
    """Every component a request body uses, directly or through another component."""
    schemas = result.get("components", {}).get("schemas", {})
    bodies = [
        operation.get("requestBody", {})
        for methods in result.get("paths", {}).values()
        for operation in methods.values()
        if isinstance(operation, dict)
    ]
    found: set[str] = set()
    _referenced(bodies, found)
    pending = set(found)
    while pending:
        more: set[str] = set()
        _referenced(schemas.get(pending.pop(), {}), more)
        pending |= more - found
        found |= more
    return found


def _with_left_out_examples(component: dict[str, Any]) -> None:
    """An optional request property with no default means "left out": its example is null
    when null means the same (nullable), an empty list for a list. Swagger UI otherwise
    fills every property, e.g. an image "string" and its strength 1 for a plain txt2img."""
    required = set(component.get("required", []))
    for name, prop in component.get("properties", {}).items():
        if name in required or "example" in prop or "default" in prop:
            continue
        if prop.get("nullable"):
            prop["example"] = None
        elif prop.get("type") == "array":
            prop["example"] = []


def schema_with_safe_integer_examples(
    result: dict[str, Any], generator: SchemaGenerator, request: Request | None, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the example bodies Swagger UI builds from the
    schema are valid requests.

    - in request bodies, an optional property with no default gets the example that means
      "left out" (_with_left_out_examples): null for a nullable seed, a random one;
    - every other integer whose range reaches past 2**53 (a seed in an answer: 0 to
      2**63 - 1) gets an `example` JavaScript holds exactly (safe_integer_example), else
      Swagger UI takes the maximum and rounds it.
    """
    # Left-out examples first: a nullable seed's example is then null (a random seed, as
    # the API documents), not the 0 that would pin every "Try it out" to one image.
    schemas = result.get("components", {}).get("schemas", {})
    for name in _request_components(result):
        _with_left_out_examples(schemas.get(name, {}))
    _with_safe_integer_examples(result.get("components", {}))
    _with_safe_integer_examples(result.get("paths", {}))
    return result


def _error_response(description: str) -> dict[str, Any]:
    return {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        "description": description,
    }


def schema_with_common_errors(
    result: dict[str, Any], generator: SchemaGenerator, request: Request | None, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: every operation lists the answers any endpoint
    may give (401 where it needs a token, 405 and 503; 415 with a request body; 507 where
    it writes), and an id in a path starts at 1, as the ids the database gives do."""
    for methods in result.get("paths", {}).values():
        for method, operation in methods.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            common = dict(_COMMON_ERRORS)
            if not operation.get("security") or operation["security"] == [{}]:
                del common[401]  # open to everyone (healthz)
            if "requestBody" in operation:
                common.update(_BODY_ERRORS)
            if method == "post" or operation.get("operationId") in _WRITING_GETS:
                common.update(_WRITE_ERRORS)
            for code, description in common.items():
                responses.setdefault(str(code), _error_response(description))
            operation["responses"] = dict(sorted(responses.items()))
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"].endswith("_id"):
                    parameter["schema"]["minimum"] = 1
    return result
