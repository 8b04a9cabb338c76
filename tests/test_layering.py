"""The import structure of ambient_dist: no cycles, and no arrow from a lower layer back up.

Every module's imports are read from its source with `ast` (nothing is imported), function-
level imports included: a lazy import still ties the lower module to the upper one.

    low helpers   errors, config, fileio, images, distributed, locking, noise, provenance
    building      data, models, metrics, sampling, objective (+ kernels under it)
    top           engine, text.task, study, launchers

Rules:
    - no cycle among ambient_dist modules at module level (what Python executes on import),
      nor through function-level imports (but objective's lazy choice of a kernel);
    - data, metrics, models, noise and sampling never import engine or the text task;
    - the low helpers import no other part of the project except the config and errors;
    - objective never imports the kernels at module level (the kernels implement its
      protocol and import it, not the other way round).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ambient_dist"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(module-level imports, all imports) of module `name`, as absolute module names.
    `from pkg import sub` counts as importing pkg.sub when that is a module of ours."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, every = set(), set()

    def add(target: str, at_top: bool) -> None:
        every.add(target)
        if at_top:
            top.add(target)

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, inside)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                add(module, inside)
                for alias in child.names:
                    if f"{module}.{alias.name}" in MODULES:
                        add(f"{module}.{alias.name}", inside)
            visit(child, inside)

    visit(ast.parse(path.read_text(), str(path)), True)
    return top, every


IMPORTS = {name: _imports(name) for name in MODULES}


def _ours(target: str) -> bool:
    return target == "ambient_dist" or target.startswith("ambient_dist.")


def _is_under(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def test_the_import_reader_sees_relative_function_level_and_from_package_imports():
    # Guards the reader itself: each kind of import below exists in the code base.
    top, every = IMPORTS["ambient_dist.data.build"]
    assert "ambient_dist.data.loader" in top                 # from .loader import ...
    assert "ambient_dist.data.dali_loader" in every - top    # imported inside build_loader
    assert "ambient_dist.distributed" in IMPORTS["ambient_dist.metrics.fid"][0]  # from ambient_dist import distributed


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per back edge a depth-first search meets."""
    # A package's __init__ importing its own submodules is how packages work, not a cycle
    # (the submodule's `from ambient_dist.pkg import x` resolves once __init__ has run).
    graph = {n: {t for t in ts if t in graph and t != n and not t.startswith(n + ".")}
             for n, ts in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    found = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package importing its submodule


def test_no_import_cycles_at_module_level():
    cycles = _cycles({name: IMPORTS[name][0] for name in MODULES})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The one lazy import allowed to point back: objective choosing a kernel implementation
# when asked (the kernels import objective's protocol at module level).
LAZY_BACK_EDGES = {("ambient_dist.objective", "kernels"), ("ambient_dist.objective", "ambient_dist.kernels")}


def test_no_import_cycles_even_through_function_level_imports():
    graph = {name: {t for t in IMPORTS[name][1]
                    if not any(name == a and _is_under(t, (b,)) for a, b in LAZY_BACK_EDGES)}
             for name in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# Lower layers and what they must never import (module level or inside functions).
LOWER = ("ambient_dist.data", "ambient_dist.metrics", "ambient_dist.models", "ambient_dist.noise",
         "ambient_dist.sampling")
UPPER = ("ambient_dist.engine", "ambient_dist.text.task")
LOW_HELPERS = ("ambient_dist.errors", "ambient_dist.fileio", "ambient_dist.images",
               "ambient_dist.distributed", "ambient_dist.locking", "ambient_dist.provenance")
LOW_HELPERS_MAY_IMPORT = ("ambient_dist.errors", "ambient_dist.config", "ambient_dist.fileio")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _is_under(n, LOWER + (
    "ambient_dist.text.latents", "ambient_dist.text.mitigations"))))
def test_data_and_its_random_draws_never_come_from_the_loss_module(name):
    # Random draws live in noise.py; data, samplers and metrics need nothing of the objective.
    bad = sorted(t for t in IMPORTS[name][1] if _is_under(t, ("ambient_dist.objective",)))
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _is_under(n, LOWER)))
def test_lower_layers_never_import_engine_or_the_text_task(name):
    bad = sorted(t for t in IMPORTS[name][1] if _is_under(t, UPPER))
    assert not bad, f"{name} imports {bad} (a lower layer importing the training engine)"


@pytest.mark.parametrize("name", LOW_HELPERS)
def test_low_helpers_import_only_config_and_errors(name):
    bad = sorted(t for t in IMPORTS[name][1] if _ours(t) and t != name
                 and not _is_under(t, LOW_HELPERS_MAY_IMPORT))
    assert not bad, f"{name} imports {bad}; it must stay below every other module"


def test_objective_does_not_import_the_kernels_at_module_level():
    kernels = ("kernels", "ambient_dist.kernels")
    bad = sorted(t for t in IMPORTS["ambient_dist.objective"][0] if _is_under(t, kernels))
    assert not bad, f"objective imports {bad} at module level; the kernels import objective"
