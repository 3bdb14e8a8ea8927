"""How the project's modules import each other: reading the settings loads no model stack, and no
module imports one that imports it back (settings.py reads the limit objects from the packages,
never the other way)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where the project's importable code lives: the top-level modules and these packages.
PACKAGES = ("llava_custom", "media", "http_api", "jobs", "testing", "bench", "tools")
HEAVY = ("torch", "transformers", "bentoml")


def loaded_after(statement: str) -> list[str]:
    """The heavy top-level packages a fresh interpreter has loaded after ``statement``."""
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return [name for name in json.loads(result.stdout.splitlines()[-1]) if name in HEAVY]


@pytest.mark.parametrize(
    "statement",
    [
        "import settings; settings.Settings()",
        "import llava_custom.limits",
        "import jobs.limits",
        "import http_api.limits",
    ],
)
def test_reading_the_settings_imports_no_model_stack_and_no_bentoml(statement: str) -> None:
    assert loaded_after(statement) == []


def module_files() -> dict[str, Path]:
    files = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports when it runs (in functions too; not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for name, path in files.items():
        # A module always imports its own package first; that edge is no circle.
        ancestors = {name.rsplit(".", 1)[0]} if "." in name else set()
        graph[name] = runtime_imports(path, set(files)) - ancestors - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert {"settings", "service", "http_api.guard", "llava_custom.limits"} <= set(graph)
    assert find_cycle(graph) is None


def test_no_package_imports_one_that_imports_it_back() -> None:
    """settings.py, service.py and startup.py count as packages of their own here."""
    packages: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        top = name.split(".")[0]
        packages.setdefault(top, set()).update(target.split(".")[0] for target in targets)
        packages[top].discard(top)
    assert find_cycle(packages) is None


def test_the_settings_read_only_limit_modules_of_the_packages_and_media() -> None:
    limits = {"http_api.limits", "jobs.limits", "llava_custom.limits"}
    assert {name for name in import_graph()["settings"] if not name.startswith("media.")} == limits
