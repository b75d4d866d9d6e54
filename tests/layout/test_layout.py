"""The package layout of DESIGN.md, checked on the source: each layer imports only the layers
below it, nothing imports the command line, no module uses another module's private names, no test
imports a benchmark, and test files have unique names."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "memengine"
# Highest first. A module may import its own layer and the layers after it in this list. ops/ and
# triton/ are one layer: the Triton kernels are a backend of the ops and share their checks.
LAYERS = [
    "cli",
    "studies",
    "integrations",
    "engine",
    "distributed",
    "plan",
    "segments",
    "nn",
    "grad",
    "autograd",
    ("ops", "triton"),
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in (layer if isinstance(layer, tuple) else (layer,))}
STANDALONE = {"models"}  # fixtures: import nothing of memengine but ops-level names


def _imports(path):
    """(imported module, imported names) for every import statement in `path`, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]


def _layer(module_name):
    parts = module_name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "memengine" else None


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_layers_below_them(path):
    own = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
    if own in (None, "__init__", "__main__", "_C"):
        return  # the package root re-exports the public API; __main__ runs the CLI
    for module, names in _imports(path):
        if not module.startswith("memengine"):
            continue
        targets = [_layer(module)] if module != "memengine" else names
        for target in targets:
            if target is None or target == own or target.startswith("_") or target not in {*RANK, *STANDALONE, "cli"}:
                continue
            assert target != "cli", f"{path.name} imports the command line ({module})"
            if own in STANDALONE or target in STANDALONE:
                assert own not in STANDALONE, f"fixtures in models/ import {module}"
                continue
            assert RANK[target] >= RANK[own], f"{own}/ imports {module}, a layer above it"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path):
    for module, names in _imports(path):
        if module.startswith("memengine"):
            private = [n for n in names if n.startswith("_") and n not in ("_C",)]
            assert not private, f"{path.name} imports private names {private} from {module}"


def test_no_test_imports_a_benchmark():
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for path in (ROOT / "tests").rglob("*.py"):
        for module, _ in _imports(path):
            assert module.split(".")[0] not in benchmarks, f"{path.name} imports the benchmark {module}"


def test_test_modules_have_unique_file_names():
    """pytest imports the tests (rootdir imports, no __init__.py) by their file name: two test files of the same
    name in different folders stop the whole run at collection ("import file mismatch")."""
    seen = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name != "conftest.py":
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    repeated = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not repeated, f"test files with the same name: {repeated}"
