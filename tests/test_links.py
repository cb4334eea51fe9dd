"""URLs are built by route name in one module per app (its links.py), and every name such a
module uses is a route: training_app and sessions_app name the API's routes, declared in
sdxl_service/api/urls.py, a layer above them, which no import shows.

Read from the source with `ast`, as tests/test_imports.py reads imports: a name is checked
whether or not a test happens to build its URL."""

import ast
from pathlib import Path

import pytest
from django.urls import get_resolver

REPO = Path(__file__).resolve().parent.parent
LINKS_MODULES = ["sessions_app/links.py", "training_app/links.py", "sdxl_service/links.py"]
# The project's packages whose modules may build URLs (tests/test_imports.py's LAYERS).
PACKAGES = ["core", "access_app", "sessions_app", "training_app", "datadir_app", "sdxl_service"]


def _reverse_calls(path: Path) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "reverse"
    ]


def _route_names() -> set[str]:
    """Every route name the project's URLconf declares, namespaced ones as `ns:name`."""
    names = set()

    def collect(resolver, prefix: str) -> None:
        names.update(prefix + key for key in resolver.reverse_dict if isinstance(key, str))
        for namespace, (_, inner) in resolver.namespace_dict.items():
            collect(inner, f"{prefix}{namespace}:")

    collect(get_resolver(), "")
    return names


@pytest.mark.parametrize("module", LINKS_MODULES)
def test_every_route_name_a_links_module_uses_exists(module):
    calls = _reverse_calls(REPO / module)
    assert calls, f"{module} builds no URL"
    dynamic = [call.lineno for call in calls if not isinstance(call.args[0], ast.Constant)]
    assert dynamic == [], f"{module}: names built at run time, which this test cannot check"
    unknown = sorted(
        f"{module}:{call.lineno}: {call.args[0].value}"
        for call in calls
        if call.args[0].value not in _route_names()
    )
    assert unknown == []


def test_only_the_links_modules_call_reverse():
    elsewhere = sorted(
        f"{path.relative_to(REPO)}:{call.lineno}"
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if str(path.relative_to(REPO)) not in LINKS_MODULES
        for call in _reverse_calls(path)
    )
    assert elsewhere == []


def test_the_check_sees_an_unknown_name():
    assert "generation" in _route_names()
    assert "admin:training_app_trainingrun_sample" in _route_names()
    assert "admin:no_such_page" not in _route_names()
