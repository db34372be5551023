"""The layers point one way: no import cycle between ropekit's modules, counting imports
inside functions too, and the generic layers (functional, modules) import no backend module."""

from __future__ import annotations

import ast
from pathlib import Path

import ropekit

SRC = Path(ropekit.__file__).parent


# compiled extension modules of the package (ropekit._C: C++, no Python imports of its own)
_EXTENSIONS = {"ropekit." + p.name.split(".")[0] for p in SRC.glob("*.so")} | {"ropekit._C"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, modules) -> set:
    """Every ropekit module ``path`` imports, at any depth of the file (function-level too)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = set()  # imports under `if TYPE_CHECKING:` never run
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ropekit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("ropekit"):
                continue
            for a in node.names:  # "from . import backends": the submodule, not the package
                if f"{mod}.{a.name}" in _EXTENSIONS:
                    continue  # a compiled extension (ropekit._C): imports nothing of ropekit
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return out


def _graph():
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name, files) if m in files and m != name}
    return graph


def test_no_import_cycles_even_through_function_level_imports():
    graph = _graph()
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_generic_layers_know_no_backend_module():
    graph = _graph()
    for layer in ("ropekit.functional", "ropekit.modules"):
        bad = {m for m in graph[layer] if m.startswith("ropekit.backends.")}
        assert not bad, f"{layer} imports {bad}"
    for be in ("ropekit.backends.cpu", "ropekit.backends.triton", "ropekit.backends.eager"):
        assert not graph[be] & {"ropekit.functional", "ropekit.modules"}, be
