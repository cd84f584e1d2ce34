"""The package's layering, checked over its import graph (every import,
function-local ones included): the packages in one order, each importing
only those below it; only the CLI imports click, nothing imports the CLI,
the in-lab agent is standard-library only, and no module imports itself
back through others."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import xenlab

PACKAGE = Path(xenlab.__file__).resolve().parent
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def type_only_nodes(tree: ast.AST) -> set[int]:
    """The nodes under `if TYPE_CHECKING:` (imports for annotations only)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def imports(path: Path, type_only: bool = True) -> set[str]:
    """Every module `path` imports (absolute names; `from pkg import mod` counts
    as pkg.mod), with those under `if TYPE_CHECKING:` unless `type_only` is False."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    skip = set() if type_only else type_only_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base != name:  # `from . import sub` in a package's __init__
                found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return found


def graph(paths, type_only: bool = True) -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports(p, type_only) if m in MODULES} for p in paths}


def test_only_the_cli_imports_click():
    offenders = [m for m, p in MODULES.items() if not m.startswith("xenlab.cli") and any(i.split(".")[0] == "click" for i in imports(p))]
    assert offenders == []


def test_nothing_imports_the_cli():
    # xenlab.__main__ is the CLI's own entry point (`python -m xenlab`).
    users = [m for m, p in MODULES.items() if not m.startswith(("xenlab.cli", "xenlab.__main__")) and any(i.startswith("xenlab.cli") for i in imports(p))]
    others = [str(p.relative_to(REPO)) for d in ("bench", "examples") for p in (REPO / d).rglob("*.py")
              if any(i.startswith("xenlab.cli") for i in imports_outside(p))]
    assert users == [] and others == []


def imports_outside(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_agent_is_standard_library_only():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for m, p in MODULES.items():
        if m.startswith("xenlab.agent"):
            foreign = {i for i in imports(p) if not i.startswith("xenlab.agent") and i.split(".")[0] not in stdlib}
            assert foreign == set(), f"{m} imports {foreign}"


def test_no_import_cycles():
    # At run time: annotations may name each other (a Lab's dom0() -> Dom0, whose lab is a Lab).
    edges = graph(MODULES.values(), type_only=False)
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        done.add(node)
        for nxt in sorted(edges.get(node, ())):
            # A package's __init__ re-exporting its submodules is not a cycle with them.
            if node.startswith(nxt + "."):
                continue
            visit(nxt, stack + [node], done)

    done: set[str] = set()
    for start in sorted(edges):
        visit(start, [], done)
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports():
    # Guard against a parser that finds nothing (which would pass every rule above).
    edges = graph(MODULES.values())
    assert "xenlab.lab.core" in edges["xenlab.cli.lab"] or "xenlab.lab" in edges["xenlab.cli.lab"]
    assert "xenlab.agent.facts" in edges["xenlab.agent.domctl"]
    assert any(i.split(".")[0] == "click" for i in imports(MODULES["xenlab.cli.common"]))


# xenlab's packages (and top-level modules) from the bottom up: each imports
# only its own and those before it. The root package (`from xenlab import
# errors`) is a lazy facade and counts as nothing.
ORDER = (
    "agent", "errors", "run", "paths", "templates", "progress", "config", "deploy", "build",
    "lab", "guest", "xenstore", "dom0", "drivers", "debug", "evtchn", "transfer", "diagnostics", "api",
    "doctor", "verify", "pytest_plugin", "cli", "__main__",
)
def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports() -> set[tuple[str, str]]:
    found = set()
    for m, p in MODULES.items():
        for target in imports(p):
            if target in MODULES and layer(m) and layer(target) and layer(target) != layer(m):
                if ORDER.index(layer(target)) > ORDER.index(layer(m)):
                    found.add((m, target))
    return found


def test_every_package_has_a_place_in_the_order():
    assert {layer(m) for m in MODULES if layer(m)} - set(ORDER) == set()


def test_packages_import_only_those_below_them():
    new = sorted(upward_imports())
    assert new == [], "imports against xenlab's package order (tests/unit/test_layering.py ORDER):\n" + \
        "\n".join(f"{m} imports {t} ({layer(t)} is above {layer(m)})" for m, t in new)


def test_the_root_package_exports_its_lazy_names_and_imports_nothing_at_run_time():
    assert sorted(xenlab.__all__) == sorted(xenlab._PUBLIC)
    root = PACKAGE / "__init__.py"
    assert {m for m in imports(root, type_only=False) if m.startswith("xenlab")} == set()  # `import xenlab` stays cheap
    # Every lazily exported name is also imported for type checkers, from where it is loaded.
    typed = {f"{base}" for base in imports(root) if base in MODULES}
    assert set(xenlab._PUBLIC.values()) <= typed
