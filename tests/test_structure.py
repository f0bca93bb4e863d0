"""The package's shape: commands are thin and on top, library modules form no import cycle, and
the project declares what it imports."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxmia"
# Import names of distributions whose module name differs from the name they are installed by.
DISTRIBUTION = {
    "PIL": "pillow",
    "dlib": "dlib-bin",
    "skimage": "scikit-image",
    "orbax": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
    "jaxlib": "jax",
    "yaml": "pyyaml",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # ``from jaxmia import train`` imports the module jaxmia.train
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {
    name: {m for m in _imports(path) if m in MODULES and m != "jaxmia"}
    for name, path in MODULES.items()
}


def test_no_library_module_imports_a_command_module():
    for name, deps in GRAPH.items():
        if name.startswith("jaxmia.commands") or name == "jaxmia.cli":
            continue
        assert not {d for d in deps if d.startswith("jaxmia.commands")}, name


def test_command_modules_only_parse_and_call_a_stage():
    """A command module is short and imports library stages, not other commands."""
    for name, path in MODULES.items():
        if not name.startswith("jaxmia.commands."):
            continue
        assert len(path.read_text().splitlines()) < 90, name
        assert not {d for d in GRAPH[name] if d.startswith("jaxmia.commands")}, name
        tree = ast.parse(path.read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert functions == {"add_arguments", "run"}, name


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize(
    "only,module", [("orbax", "jaxmia.checkpoint"), ("tensorflow_datasets", "jaxmia.data")]
)
def test_one_module_imports_each_heavy_library(only, module):
    users = {
        name
        for name, path in MODULES.items()
        if any(m == only or m.startswith(only + ".") for m in _imports(path))
    }
    assert users == {module}


def _requirement_names(specs: list[str]) -> set[str]:
    names = set()
    for spec in specs:
        name = spec.split(";")[0]
        for sep in "<>=![ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def _undeclared(paths, declared: set[str]) -> set[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    local = {"jaxmia", "benchmarks"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    missing = set()
    for path in paths:
        for module in _imports(path):
            top = module.split(".")[0]
            if top in stdlib or top in local:
                continue
            if DISTRIBUTION.get(top, top).lower().replace("_", "-") not in declared:
                missing.add(f"{top} ({path.name})")
    return missing


def test_every_third_party_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    missing = _undeclared(PACKAGE.rglob("*.py"), declared)
    assert not missing, f"imported but not in pyproject dependencies: {sorted(missing)}"
    dev = declared | _requirement_names(project["optional-dependencies"]["dev"])
    data = ROOT / "tests" / "data"  # scripts that made reference files with the peers, run by hand
    tests = [p for p in (ROOT / "tests").rglob("*.py") if data not in p.parents]
    missing = _undeclared(tests, dev)
    assert not missing, f"tests import what the dev extra does not install: {sorted(missing)}"
    bench = dev | _requirement_names(project["optional-dependencies"]["bench"])
    missing = _undeclared(data.rglob("*.py"), bench)
    assert not missing, f"tests/data scripts import what dev and bench do not: {sorted(missing)}"


def test_every_dev_dependency_is_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # pytest-xdist is a plugin the test command loads (-n 2), never imported.
    tools = {"pytest", "pytest-xdist", "ruff"}
    dev = _requirement_names(project["optional-dependencies"]["dev"]) - tools
    used = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        used |= {DISTRIBUTION.get(m.split(".")[0], m.split(".")[0]) for m in _imports(path)}
    assert dev <= {u.lower().replace("_", "-") for u in used}, dev - used
