"""The house's import graph: layers in one direction, no cycle between packages or modules.

Read from the source with `ast` (function-local imports count too: a cycle hidden inside a
function still ties two packages together), so the test sees what the code says, not what
one run happened to import.
"""

import ast
import graphlib
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Each package may import only those before it (README, "Layout").
LAYERS = [
    "core",  # the domain error and console helpers
    "sdxl_engine",  # the model engine: no Django
    "access_app",  # API tokens
    "sessions_app",  # sessions, images, storage, the session lock
    "training_app",  # training runs, LoRA files, generations, workers
    "datadir_app",  # folder walks: rescan, verify, legacy import, archives
    "sdxl_service",  # the Django project and its API layer
    "bench",  # GPU benchmarks, beside the service
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in LAYERS
        for path in (REPO / package).rglob("*.py")
        if "migrations" not in path.parts
    }


def _imports(path: Path) -> set[tuple[int, str]]:
    """(line, name) of every absolute name `path` imports: modules, and `module.name` for
    from-imports (which may name a submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the project imports absolutely"
            found.add((node.lineno, node.module))
            found.update((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def _imported_names(path: Path) -> set[str]:
    return {name for _, name in _imports(path)}


def _module_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        module: {name for name in _imported_names(path) if name in modules and name != module}
        for module, path in modules.items()
    }


def _package_graph(modules: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The module graph seen at the first `depth` parts of each name (1: top-level
    packages; 2: their sub-packages and modules, e.g. sdxl_service.api)."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:depth])

    graph = defaultdict(set)
    for module, imported in modules.items():
        for name in imported:
            if package(name) != package(module):
                graph[package(module)].add(package(name))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_graph_holds_the_imports_the_code_makes():
    graph = _module_graph()
    assert "core.errors" in graph["sessions_app.locking"]
    # A function-local import counts: the training service loads the engine lazily.
    assert "sdxl_engine.training" in graph["training_app.services.runs"]


@pytest.mark.parametrize("depth", [1, 2], ids=["packages", "sub-packages"])
def test_no_import_cycle_between_packages(depth):
    assert _cycle(_package_graph(_module_graph(), depth)) is None


def test_no_import_cycle_between_modules():
    assert _cycle(_module_graph()) is None


def test_each_package_imports_only_the_layers_below_it():
    modules = _modules()
    upward = sorted(
        f"{path.relative_to(REPO)}:{line}: {module} imports {name}, a layer above it"
        for module, path in modules.items()
        for line, name in _imports(path)
        if name in modules and LAYERS.index(name.split(".")[0]) > LAYERS.index(module.split(".")[0])
    )
    assert upward == []


def test_no_module_imports_a_sibling_by_its_bare_name():
    """`import benchmark` beside bench/benchmark.py works only with the folder on sys.path,
    and the graph above cannot see it: every project module is imported by its full name."""
    bare = sorted(
        f"{path.relative_to(REPO)}:{line}: {module} imports {name}"
        for module, path in _modules().items()
        for line, name in _imports(path)
        if name.split(".")[0] not in sys.stdlib_module_names
        and (path.parent / f"{name.split('.')[0]}.py").exists()
        and path.parent != REPO
    )
    assert bare == []
