"""The one propagation driver (``ctsft_lens.cdt.driver``): batch → cache → per-layer chunks →
``propagate``, walked by head relevance, ``decompose``, the head views and the rule benchmark
(issues 28, 39)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ctsft_lens.cdt.driver import by_layer, chunk_size, forwards
from ctsft_lens.cdt.rules import PRESETS
from ctsft_lens.cdt.split import Split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples(indonesian):
    return indonesian.examples("test")[:5]


def test_chunks_cover_every_source_once_in_layer_order(tiny_qwen, examples):
    sources = [(1, 3), (0, 2), (1, 0), (0, 2), (0, 1)]
    seen, starts = [], []
    for fwd in forwards(tiny_qwen, examples, sources, batch_size=2, chunk=1):
        starts.append(fwd.start)
        seen.append([(c.layer, h) for c in fwd.chunks() for h in c.heads])
        assert all(len(c.heads) == 1 for c in fwd.chunks())
    assert starts == [0, 2, 4]
    assert seen == [[(0, 1), (0, 2), (1, 0), (1, 3)]] * 3
    assert by_layer(sources) == {0: [1, 2], 1: [0, 3]}


def test_a_memory_budget_sizes_the_chunks(tiny_qwen, examples):
    n_heads = tiny_qwen.cfg.n_heads
    fwd = next(forwards(tiny_qwen, examples, [(0, h) for h in range(n_heads)], batch_size=4, memory_gb=1e-6))
    assert fwd.chunk == chunk_size(tiny_qwen, 4, fwd.batch.input_ids.shape[1], 1e-6) == 1
    assert len(list(fwd.chunks())) == n_heads
    big = next(forwards(tiny_qwen, examples, [(0, h) for h in range(n_heads)], batch_size=4, memory_gb=64))
    assert [c.heads for c in big.chunks()] == [list(range(n_heads))]


def test_the_cache_is_released_when_the_driver_moves_on(tiny_qwen, examples):
    held = []
    for fwd in forwards(tiny_qwen, examples, [(0, 0)], batch_size=2):
        assert fwd.cache is not None
        held.append(fwd)
    assert all(f.cache is None for f in held)


def test_chunk_size_does_not_change_the_numbers(tiny_qwen, examples):
    """β at the final norm of each source, propagated one head at a time or all together."""
    def betas(chunk):
        out = {}
        for fwd in forwards(tiny_qwen, examples, [(0, h) for h in range(4)], batch_size=5, chunk=chunk,
                            rules=PRESETS["exact"]):
            for c in fwd.chunks():
                got = {}
                c.propagate(lambda name, x: got.setdefault(name, x) if name == "ln_final.hook_out" else None)
                x: Split = got["ln_final.hook_out"]
                out.update({h: x.beta[i, :, -1] for i, h in enumerate(c.heads)})
        return out

    one, together = betas(1), betas(4)
    for h in range(4):
        torch.testing.assert_close(one[h], together[h], rtol=1e-5, atol=1e-6)


def _users(path: Path, name: str) -> list[str]:
    """Functions of ``path`` (by name) that read the bare name ``name`` (call it or pass it on)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load) for n in ast.walk(node)):
                found.append(node.name)
    return found


def test_the_loop_lives_in_the_driver_only():
    """``cache_names`` (what a propagation's cache holds) is read by the driver alone, and
    ``propagate`` is called by the driver's chunks alone (relevance hands them its own binding):
    ``decompose``, the head views and ``label_push`` walk the driver too."""
    files = sorted((REPO / "ctsft_lens").rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    callers = {}
    for path in files:
        rel = str(path.relative_to(REPO))
        if rel == "ctsft_lens/cdt/propagate.py":
            continue
        for name in ("cache_names", "propagate"):
            for fn in _users(path, name):
                callers.setdefault(name, set()).add(f"{rel}:{fn}")
    assert callers.get("cache_names") == {"ctsft_lens/cdt/driver.py:forward"}
    assert callers.get("propagate") == {"ctsft_lens/cdt/driver.py:propagate", "ctsft_lens/cdt/relevance.py:_relevance_chunk"}


def test_no_module_imports_a_private_name_of_another():
    """Private names stay in their sub-package: the modules of ``cli/`` or ``experiments/`` share
    helpers among themselves (and their ``__init__`` re-exports them, so old names keep importing),
    but no module imports a private name from another package's module."""
    files = sorted((REPO / "ctsft_lens").rglob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))
    bad = []
    for path in files:
        rel = path.relative_to(REPO)
        own = ".".join(rel.parent.parts)  # the importer's package, e.g. ctsft_lens.cli
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ctsft_lens"):
                if own != "ctsft_lens" and (node.module or "").rpartition(".")[0] == own:
                    continue
                bad += [f"{rel}: {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
