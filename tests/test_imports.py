"""The package's import graph: no cycle, and the scoring layers in order.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``A -> B`` for every
import statement that runs when ``A`` is imported (module level, class bodies, top-level ``if`` /
``try``; not function bodies, not ``if TYPE_CHECKING:``). Importing ``P.x`` first runs the package
``P/__init__.py``, so ``A -> P`` is an edge too, unless ``P`` encloses ``A`` (then ``P`` started
before ``A``; the root ``ctsft_lens`` encloses every module). A cycle in this graph is an import
that can meet a half-initialised module, depending on which module a user imports first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ctsft_lens"
PACKAGE = "ctsft_lens"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], *, in_functions: bool) -> list[ast.stmt]:
    """Import statements executed on import (``in_functions``: every import statement)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if in_functions:
                found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        elif isinstance(node, ast.If) and _type_checking(node):
            if in_functions:
                found += _import_nodes(node.body, in_functions=True)
        else:
            for name in ("body", "orelse", "finalbody", "handlers"):
                found += _import_nodes(getattr(node, name, []) or [], in_functions=in_functions)
    return found


def imports(name: str, modules: dict[str, Path], *, in_functions: bool = False) -> set[str]:
    """The package modules ``name`` imports (with the packages whose ``__init__`` that runs)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(tree.body, in_functions=in_functions):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:
            anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in modules else base)
    edges = set()
    for target in targets:
        if not target.startswith(PACKAGE + ".") or target not in modules:
            continue
        edges.add(target)
        parts = target.split(".")
        for i in range(2, len(parts)):  # the packages P.x passes through, if not around `name`
            pkg = ".".join(parts[:i])
            if not (name == pkg or name.startswith(pkg + ".")):
                edges.add(pkg)
    edges.discard(name)
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: imports(name, modules) for name in modules if name != PACKAGE}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_even_through_function_imports_in_scoring_and_training():
    """An import inside a function hides a cycle from the module-level graph without removing it:
    the scoring layers (CD-T, total effect, the registry, discovery) and training have none."""
    modules = _modules()
    mine = ("ctsft_lens.cdt", "ctsft_lens.scoring", "ctsft_lens.total_effect", "ctsft_lens.discovery",
            "ctsft_lens.train")
    keep = {m for m in modules if m.startswith(mine)}
    graph = {name: imports(name, modules, in_functions=True) & keep for name in keep}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_the_walker_sees_a_cycle():
    """The check is live: a two-module cycle, and one through a package's ``__init__``, are found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_names_from_the_root_facade():
    """``ctsft_lens/__init__.py`` re-exports the public API; a module inside must not import a name
    from it at module level (the root is half-initialised while they load)."""
    modules = _modules()
    for name, path in modules.items():
        if name == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _import_nodes(tree.body, in_functions=False):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE and not node.level:
                bad = [a.name for a in node.names if f"{PACKAGE}.{a.name}" not in modules]
                assert not bad, f"{name} imports {bad} from the {PACKAGE} facade"


def test_scoring_layers():
    """The scoring registry sits above CD-T and the total-effect scorings: neither imports it, nor
    discovery, not even inside a function; the discovery options sit below all of them."""
    modules = _modules()
    above = {"ctsft_lens.scoring", "ctsft_lens.discovery"}
    for name in modules:
        if name.startswith("ctsft_lens.cdt") or name in ("ctsft_lens.total_effect", "ctsft_lens.discovery_config"):
            seen = imports(name, modules, in_functions=True)
            assert not seen & above, f"{name} imports {sorted(seen & above)}"
    config = imports("ctsft_lens.discovery_config", modules, in_functions=True)
    assert not {m for m in config if m.startswith("ctsft_lens.cdt.") and m != "ctsft_lens.cdt.rules"}, config
