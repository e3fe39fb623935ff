"""The package's import graph: no cycle, and floors that only point down.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``A -> B`` for every
import statement that runs when ``A`` is imported (module level, class bodies, top-level ``if`` /
``try``; not function bodies, not ``if TYPE_CHECKING:``). Importing ``P.x`` first runs the package
``P/__init__.py``, so ``A -> P`` is an edge too, unless ``P`` encloses ``A`` (then ``P`` started
before ``A``; the root ``ctsft_lens`` encloses every module). A cycle in this graph is an import
that can meet a half-initialised module, depending on which module a user imports first.

The floors (``FLOORS``, bottom to top) are read from every arrow, deferred ones included: each
import statement anywhere (function bodies, ``if TYPE_CHECKING:``), each
``importlib.import_module("ctsft_lens....")`` and each lazy-export table (a module-level dict of
names to ``ctsft_lens....`` paths); importing a name of the root facade (``from ctsft_lens import
__version__``) is an arrow to the root, the top floor. An arrow may point along its floor or down;
one that points up fails as a cycle does, unless ``UPWARD`` lists it with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ctsft_lens"
PACKAGE = "ctsft_lens"

# The floors, bottom to top: a module sits on the floor of the longest name here that is it or a
# package around it; it may import its own floor and those below.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "hub", "progress"),
    ("options", "files", "distributed", "devices", "config_tables"),
    ("tasks",),
    ("models",),
    ("batching", "forward", "metrics", "evaluate", "means"),
    ("circuit", "masks", "statistics"),  # statistics ranks heads as circuits do (rank_heads)
    ("train", "adapters", "eap_graph"),
    ("cdt",),  # takes Rules and plain values: nothing in it reads the discovery options
    ("faithfulness", "mib"),
    ("scoring",),
    ("discovery",),
    ("plots", "explore", "compare", "score_cache"),
    ("experiments",),
    ("cli",),
    ("",),  # the root facade, ctsft_lens/__init__.py
]

# The arrows that point up today, each with why it is still there (all inside a function).
UPWARD: dict[tuple[str, str], str] = {
    ("ctsft_lens.adapters", "ctsft_lens"): "an adapter file records the __version__ that wrote it",
    ("ctsft_lens.cli", "ctsft_lens"): "ctsft --version prints __version__",
}


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


def _named(node: ast.Import | ast.ImportFrom, here: str, modules: dict[str, Path]) -> set[str]:
    """The modules an import statement names (``from P import x``: ``P.x`` if a module, else ``P``),
    ``here`` being the package that relative imports start from."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    base = node.module or ""
    if node.level:
        anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


def _here(name: str, modules: dict[str, Path]) -> str:
    return name if _is_package(name, modules) else name.rpartition(".")[0]


def imports(name: str, modules: dict[str, Path], *, in_functions: bool = False) -> set[str]:
    """The package modules ``name`` imports (with the packages whose ``__init__`` that runs)."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in _import_nodes(tree.body, in_functions=in_functions):
        targets |= _named(node, _here(name, modules), modules)
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


def _deferred(tree: ast.Module) -> set[str]:
    """Module paths imported by name: ``import_module("ctsft_lens.x")`` calls anywhere, and the values
    of module-level dicts of ``"ctsft_lens.x"`` strings (lazy-export tables)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func == "import_module" and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            found |= {v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                      and v.value.startswith(PACKAGE + ".")}
    return found


def arrows(name: str, modules: dict[str, Path], source: str | None = None) -> set[str]:
    """Every package module ``name`` imports, when it loads or later: import statements anywhere
    (function bodies and ``if TYPE_CHECKING:`` too) and :func:`_deferred` paths; the root facade
    when a name of its own is imported from it. Only the modules named: the packages passed
    through on the way are the cycle check's business."""
    tree = ast.parse(source if source is not None else modules[name].read_text(encoding="utf-8"))
    targets = _deferred(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets |= _named(node, _here(name, modules), modules)
    return {t for t in targets if t in modules} - {name}


def floor(name: str) -> int:
    """The index in ``FLOORS`` of the floor ``name`` sits on (``-1``: none)."""
    best, level = -1, -1
    for i, group in enumerate(FLOORS):
        for entry in group:
            prefix = f"{PACKAGE}.{entry}" if entry else PACKAGE
            inside = name == prefix or (entry and name.startswith(prefix + "."))  # "": the root alone
            if inside and len(prefix) > best:
                best, level = len(prefix), i
    return level


def _upward(graph: dict[str, set[str]], level: dict[str, int]) -> list[tuple[str, str]]:
    """The arrows ``(a, b)`` of ``graph`` from a floor to one above it."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if level[b] > level[a])


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
    mine = ("ctsft_lens.cdt", "ctsft_lens.scoring", "ctsft_lens.discovery",
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
    """``cdt/`` takes Rules and plain values: nothing in it imports the scoring package (the discovery
    options, the registry, expansion) or discovery, not even inside a function. In ``scoring/`` the
    options read only cdt's rule table, and the total-effect scorings neither CD-T nor the registry."""
    modules = _modules()
    scoring = {m for m in modules if m.startswith("ctsft_lens.scoring")} | {"ctsft_lens.discovery"}
    for name in modules:
        if name.startswith("ctsft_lens.cdt"):
            seen = imports(name, modules, in_functions=True)
            assert not seen & scoring, f"{name} imports {sorted(seen & scoring)}"
    config = imports("ctsft_lens.scoring.config", modules, in_functions=True)
    assert not {m for m in config if m.startswith("ctsft_lens.cdt.") and m != "ctsft_lens.cdt.rules"}, config
    effect = imports("ctsft_lens.scoring.total_effect", modules, in_functions=True)
    assert not {m for m in effect if m.startswith(("ctsft_lens.cdt", "ctsft_lens.scoring."))}, effect


def test_every_module_sits_on_a_floor_and_every_floor_holds_one():
    modules = _modules()
    lost = [name for name in modules if floor(name) < 0]
    assert not lost, f"on no floor: {lost} (add each to FLOORS in tests/test_imports.py)"
    for group in FLOORS:
        for entry in group:
            prefix = f"{PACKAGE}.{entry}" if entry else PACKAGE
            held = [m for m in modules if m == prefix or m.startswith(prefix + ".")]
            assert held, f"FLOORS names {prefix}: no such module"


def test_floors_point_down_even_through_function_and_lazy_imports():
    """No arrow points to a floor above, counting imports inside functions and lazy exports: the
    ones ``UPWARD`` lists are the only exceptions, and each of them is still in the code."""
    modules = _modules()
    graph = {name: arrows(name, modules) for name in modules}
    up = _upward(graph, {name: floor(name) for name in modules})
    unlisted = [f"{a} -> {b}" for a, b in up if (a, b) not in UPWARD]
    assert not unlisted, "arrows up a floor (FLOORS in tests/test_imports.py): " + ", ".join(unlisted)
    gone = [f"{a} -> {b}" for a, b in UPWARD if (a, b) not in up]
    assert not gone, "UPWARD lists arrows no longer up (remove them): " + ", ".join(gone)
    down = {a: {b for b in targets if (a, b) not in UPWARD} for a, targets in graph.items()}
    cycle = _cycle(down)  # within a floor: across floors, a cycle needs an arrow up
    assert cycle is None, "import cycle (counting imports inside functions and lazy exports): " + " -> ".join(cycle)


def test_the_walker_reads_functions_and_lazy_exports():
    """The floor check is live: a function-local import, an ``import_module`` string, a lazy-export
    table and a name of the root facade are arrows, and one to a floor above is found."""
    modules = dict.fromkeys([PACKAGE, f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.d", f"{PACKAGE}.p",
                             f"{PACKAGE}.p.e"], ROOT / "x.py")
    source = (
        "import importlib\n"
        "_LAZY = {'thing': 'ctsft_lens.b'}\n"
        "def f():\n"
        "    from ctsft_lens.c import x\n"
        "    from ctsft_lens import __version__\n"
        "    return importlib.import_module('ctsft_lens.d')\n"
        "class K:\n"
        "    def g(self):\n"
        "        from ctsft_lens.p import e\n"
    )
    seen = arrows(f"{PACKAGE}.a", modules, source)
    assert seen == {PACKAGE, f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.d", f"{PACKAGE}.p.e"}, seen
    assert _upward({"a": {"b", "c"}, "b": set(), "c": set()}, {"a": 1, "b": 0, "c": 2}) == [("a", "c")]
    assert floor(f"{PACKAGE}.cdt.rules") == floor(f"{PACKAGE}.cdt.relevance") < floor(f"{PACKAGE}.scoring.config")
    assert floor(f"{PACKAGE}.nowhere") == -1 and floor(PACKAGE) == len(FLOORS) - 1
