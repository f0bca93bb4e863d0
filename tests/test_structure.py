"""The package's shape: infrastructure at the top, the rest in role subpackages, layered; commands
are thin and on top; no import cycle; the project declares what it imports.

The layers, from the top: ``cli`` -> ``commands/`` -> ``stages/`` -> the role packages
(``data/``, ``recognizers/``, ``attacks/``, ``judges/``, ``service/``, ``report/``,
``pretrained/``) and the infrastructure modules at the top of ``jaxmia/``."""

from __future__ import annotations

import ast
import subprocess
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
            # ``from jaxmia import train`` imports the module jaxmia.recognizers.train
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {
    # a package's __init__ holds only its docstring: ``from jaxmia.data import faces`` uses faces
    name: {m for m in _imports(path) if m in MODULES and MODULES[m].name != "__init__.py"}
    for name, path in MODULES.items()
}


# The modules at the top of jaxmia/: infrastructure every layer may use.
INFRASTRUCTURE = {
    f"jaxmia.{m}"
    for m in ("config", "errors", "files", "workdir", "batching", "sharding", "transforms")
} | {"jaxmia.checkpoint"}
# Commands whose whole stage is one library module's entry point, outside stages/.
COMMAND_ENTRY = {
    "jaxmia.commands.models": {"jaxmia.pretrained.fetch"},
    "jaxmia.commands.serve": {"jaxmia.service.server"},
    "jaxmia.commands.import_torch": {"jaxmia.recognizers.torch_import"},
    # the judges' one-line verdicts it prints after the stage
    "jaxmia.commands.evaluate": {"jaxmia.judges.panel"},
}
# What the judges may use of the attacks: the losses (in the engine's module) and the file the
# inversion stages write.
JUDGES_FROM_ATTACKS = {"jaxmia.attacks.inversion", "jaxmia.attacks.inversions_file"}


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_at_most_15_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 15, top


def test_every_module_is_infrastructure_or_in_a_role_package():
    roles = ("data", "recognizers", "attacks", "judges", "service", "stages", "report")
    roles += ("pretrained", "commands")
    for name, path in MODULES.items():
        if path.parent == PACKAGE and path.name != "__init__.py":
            assert name in INFRASTRUCTURE | {"jaxmia.cli", "jaxmia.__main__"}, name
        elif path.parent != PACKAGE:
            assert name.split(".")[1] in roles, name
    for role in roles:
        assert (PACKAGE / role / "__init__.py").is_file(), role


def test_commands_import_only_stages_and_infrastructure():
    for name, deps in GRAPH.items():
        if not name.startswith("jaxmia.commands."):
            continue
        allowed = INFRASTRUCTURE | COMMAND_ENTRY.get(name, set())
        extra = {d for d in deps if not _in(d, "jaxmia.stages") and d not in allowed}
        assert not extra, f"{name} imports {sorted(extra)}"


def test_only_commands_and_stages_import_stages():
    for name, deps in GRAPH.items():
        if _in(name, "jaxmia.stages") or _in(name, "jaxmia.commands") or name == "jaxmia.cli":
            continue
        assert not {d for d in deps if _in(d, "jaxmia.stages")}, name


def test_judges_use_only_the_losses_and_the_inversions_file_of_the_attacks():
    for name, deps in GRAPH.items():
        if not _in(name, "jaxmia.judges"):
            continue
        extra = {d for d in deps if _in(d, "jaxmia.attacks") and d not in JUDGES_FROM_ATTACKS}
        assert not extra, f"{name} imports {sorted(extra)}"


def test_the_cli_imports_only_the_chosen_commands_module(monkeypatch):
    from jaxmia import cli

    imported = []
    monkeypatch.setattr(cli.importlib, "import_module", lambda m: imported.append(m) or _Args())
    cli._parser("clone")
    assert imported == ["jaxmia.commands.clone"]
    imported.clear()
    cli._parser(None)  # jaxmia --help
    assert imported == []
    assert set(cli.COMMANDS) == {
        p.stem.replace("_", "-") for p in (PACKAGE / "commands").glob("[!_]*.py")
    }


class _Args:
    """A command module's stand-in: takes its arguments and adds none."""

    @staticmethod
    def add_arguments(parser) -> None:
        del parser


def test_the_cli_loads_no_stage_for_a_command_without_one():
    """``jaxmia models list`` runs without importing a stage or another command's module."""
    code = (
        "import sys; from jaxmia import cli; cli._parser('models'); "
        "print(sorted(m for m in sys.modules if m.startswith('jaxmia.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    loaded = set(eval(out))  # a printed list of module names
    assert not {m for m in loaded if _in(m, "jaxmia.stages")}, loaded
    assert {m for m in loaded if _in(m, "jaxmia.commands")} == {
        "jaxmia.commands",
        "jaxmia.commands.models",
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
    "only,module", [("orbax", "jaxmia.checkpoint"), ("tensorflow_datasets", "jaxmia.data.faces")]
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
    tests = ROOT / "tests"  # conftest, and the test folders as packages (tests/ is on the path)
    local = {"jaxmia", "benchmarks"} | {p.stem for p in tests.glob("*.py")}
    local |= {p.name for p in tests.iterdir() if p.is_dir()}
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
    data = (
        ROOT / "tests" / "reference"
    )  # scripts that made reference files with the peers, run by hand
    tests = [p for p in (ROOT / "tests").rglob("*.py") if data not in p.parents]
    missing = _undeclared(tests, dev)
    assert not missing, f"tests import what the dev extra does not install: {sorted(missing)}"
    bench = dev | _requirement_names(project["optional-dependencies"]["bench"])
    missing = _undeclared(data.rglob("*.py"), bench)
    assert not missing, (
        f"tests/reference scripts import what dev and bench do not: {sorted(missing)}"
    )


def test_every_dev_dependency_is_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # pytest-xdist is a plugin the test command loads (-n 2), never imported.
    tools = {"pytest", "pytest-xdist", "ruff"}
    dev = _requirement_names(project["optional-dependencies"]["dev"]) - tools
    used = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        used |= {DISTRIBUTION.get(m.split(".")[0], m.split(".")[0]) for m in _imports(path)}
    assert dev <= {u.lower().replace("_", "-") for u in used}, dev - used
