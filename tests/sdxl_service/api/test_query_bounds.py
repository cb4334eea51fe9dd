"""Numeric query and path parameters out of any range a database stores answer 400 (or
404 for an id that cannot exist), never 500, and the schema shows each query bound."""

import pytest

pytestmark = pytest.mark.django_db

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    "query, field",
    [
        (f"offset={HUGE}", "offset"),
        (f"limit={HUGE}", "limit"),
        (f"offset={2**63 - 1}&limit=1000", "offset"),
        (f"offset=-{HUGE}", "offset"),
    ],
)
def test_list_sessions_refuses_numbers_past_the_bounds(api, query, field):
    response = api.get(f"/list_sessions?{query}")
    assert response.status_code == 400, response.content
    assert field in response.json()["message"]


def test_list_sessions_answers_at_the_largest_offset(api):
    from sdxl_service.api.fields import MAX_QUERY_INTEGER

    body = api.get(f"/list_sessions?offset={MAX_QUERY_INTEGER}&limit=1000").json()
    assert body["sessions"] == [] and body["next_offset"] is None


@pytest.mark.parametrize(
    "path",
    [
        f"/sessions/{HUGE}",
        f"/sessions/1/images/{HUGE}",
        f"/sessions/1/images/{HUGE}/mask",
        f"/generations/{HUGE}",
        f"/generations/{HUGE}/0.png",
        f"/training_samples/{HUGE}.png",
    ],
)
def test_ids_in_paths_past_any_stored_id_are_404(api, path):
    assert api.get(path).status_code == 404


def test_the_schema_bounds_every_integer_query_parameter(schema_document):
    integers = [
        (path, parameter)
        for path, operations in schema_document["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and parameter["schema"].get("type") == "integer"
    ]
    assert integers  # list_sessions' limit and offset at least
    for path, parameter in integers:
        assert "minimum" in parameter["schema"], (path, parameter)
        assert "maximum" in parameter["schema"], (path, parameter)
