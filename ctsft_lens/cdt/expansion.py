"""Iterative backward expansion: from the logits back through the heads that feed them.

Depth 0 scores every head against the logits and keeps the top ``ratio`` of all heads (at
least one). Depth ``d`` takes the heads kept at depth ``d - 1`` as targets, scores every head
in an earlier layer against each of them, combines those scores (``aggregate``: their sum, as
the public CD-T notebooks do, or their maximum) and adds the top ``ratio`` (of all heads) among
the heads not yet kept. The search stops early when no candidate is left.

Cost: a source's β is the same whichever target reads it, so one CD-T propagation scores every
source against the logits *and* every head (``head_relevances(target="all")``); the depths are
then table lookups. Depths 0..D together cost what depth 0 costs (the public CD-T code, and
ctsft_lens 0.1, propagate again per depth), and several scorings share that pass too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ctsft_lens.batching import check_examples
from ctsft_lens.cdt.decompose import DEFAULT_DECOMPOSITION, Decomposition, check_decomposition
from ctsft_lens.cdt.relevance import SCORERS, Relevance, Scoring, check_options, head_relevance, head_relevances
from ctsft_lens.circuit import Circuit, Edge, Head, rank_heads
from ctsft_lens.means import head_means
from ctsft_lens.models.bridge import model_info
from ctsft_lens.options import AGGREGATES, AttentionRule, Aggregate, Baseline, check
from ctsft_lens.tasks.base import Example


def _check_expansion(ratio: float, max_depth: int, aggregate: str) -> None:
    check("aggregate", aggregate, AGGREGATES)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")


def n_to_keep(ratio: float, n_heads_total: int) -> int:
    """Heads kept per depth: ``floor(ratio * all heads)``, at least one."""
    return max(1, int(ratio * n_heads_total))


@torch.no_grad()
def discover(
    model: Any,
    examples: Sequence[Example],
    *,
    scoring: Scoring = "projection",
    ratio: float = 0.02,
    max_depth: int = 2,
    baseline: Baseline = "mean",
    attention: AttentionRule | None = None,
    aggregate: Aggregate = "sum",
    positions: tuple[int, ...] | None = None,
    reference: Sequence[Example] | None = None,
    batch_size: int = 8,
    memory_gb: float | None = None,
    progress: bool = True,
    ig_steps: int = 5,
    decomposition: Decomposition = DEFAULT_DECOMPOSITION,
    bias_o: str | None = None,
    strict: bool = True,
    streams: str = "beta",
) -> Circuit:
    """Find a circuit of attention heads by CD-T relevance and iterative backward expansion.

    ``positions`` limits each source head to those prompt tokens (e.g. ``(-1,)``; default all).
    ``reference`` (default ``examples``) gives the label-balanced head means of the ``"mean"``
    baseline. ``scores[d]`` of the result is the depth-``d`` table: the logits scores at depth
    0; after that the ``aggregate`` over that depth's targets — ``"sum"`` (as the public CD-T
    notebooks) or ``"max"`` — NaN where a head was not upstream of any target. An edge records
    the target a head scored highest against.
    With the total-effect scorings (``attribution``, ``attribution-ig``, ``patching``) a head's
    score already counts every path to the logits, so depth ``d`` adds the next ``ratio`` heads
    of the one logits table (edges to the logits; docs/method.md).
    ``strict``: raise on a source whose CD-T decomposition is unstable (non-finite, or β+γ off
    the forward); else warn and list it in ``Circuit.unstable`` (its NaN score is never ranked).
    ``streams``: CD-T's β-only fast path (default) or the two-stream reference (``"both"``).
    All depths come from one CD-T propagation (module docstring); :func:`discover_circuits` gives
    several scorings from that one pass.
    """
    return discover_circuits(model, examples, scorings=(scoring,), ratio=ratio, max_depth=max_depth,
                             baseline=baseline, attention=attention, aggregate=aggregate, positions=positions,
                             reference=reference, batch_size=batch_size, memory_gb=memory_gb, progress=progress,
                             ig_steps=ig_steps, decomposition=decomposition, bias_o=bias_o, strict=strict,
                             streams=streams)[scoring]


@torch.no_grad()
def discover_circuits(
    model: Any,
    examples: Sequence[Example],
    *,
    scorings: Sequence[Scoring] = ("projection",),
    ratio: float = 0.02,
    max_depth: int = 2,
    baseline: Baseline = "mean",
    attention: AttentionRule | None = None,
    aggregate: Aggregate = "sum",
    positions: tuple[int, ...] | None = None,
    reference: Sequence[Example] | None = None,
    batch_size: int = 8,
    memory_gb: float | None = None,
    progress: bool = True,
    ig_steps: int = 5,
    decomposition: Decomposition = DEFAULT_DECOMPOSITION,
    bias_o: str | None = None,
    strict: bool = True,
    streams: str = "beta",
) -> dict[str, Circuit]:
    """:func:`discover` for several scorings, keyed by scoring; the CD-T ones (keys of ``SCORERS``)
    share one propagation, so projection and magnitude at depths 0..D cost one CD-T pass.
    Same options and checks as :func:`discover`."""
    scorings = tuple(scorings)
    if not scorings or len(set(scorings)) != len(scorings):
        raise ValueError(f"scorings must be distinct and at least one, got {list(scorings)}")
    for name in scorings:
        check_options(name, baseline, attention)
    _check_expansion(ratio, max_depth, aggregate)
    rules = check_decomposition(decomposition)
    check_examples(examples)
    ref = reference if reference is not None else examples
    means = head_means(model, ref, batch_size=batch_size, progress=progress) if baseline == "mean" else None
    common = dict(baseline=baseline, attention=attention, positions=positions, means=means, batch_size=batch_size,
                  memory_gb=memory_gb, progress=progress, decomposition=decomposition, bias_o=bias_o, strict=strict,
                  streams=streams)
    cdt = tuple(s for s in scorings if s in SCORERS)
    rels: dict[str, Relevance] = {}
    if cdt:  # the logits and every head as targets: all depths from one pass
        rels = head_relevances(model, examples, scorings=cdt, target="all" if max_depth > 0 else "logits", **common)
    for name in scorings:
        if name not in rels:  # total effect: one logits table
            rels[name] = head_relevance(model, examples, scoring=name, ig_steps=ig_steps, **common)
    options = {"baseline": baseline, "attention": rules.attention if attention is None else attention,
               "decomposition": rules.spec(), "bias_o": rules.bias if bias_o is None else bias_o,
               "streams": streams, "n_examples": len(examples), "n_reference": len(ref) if baseline == "mean" else 0,
               "mean_positions": "pooled", "source_positions": None if positions is None else list(positions)}
    return {name: circuit_from_relevance(model, rels[name], ratio=ratio, max_depth=max_depth, aggregate=aggregate,
                                         options={**options, "ig_steps": ig_steps} if name == "attribution-ig" else options)
            for name in scorings}


def circuit_from_relevance(model: Any, rel: Relevance, *, ratio: float = 0.02, max_depth: int = 2,
                           aggregate: Aggregate = "sum", options: dict[str, Any] | None = None) -> Circuit:
    """The circuit of a relevance table already scored (``head_relevances(target="all")`` for
    depths > 0): :func:`expand` plus the model's fingerprint and ``options`` (how ``rel`` was
    scored, recorded in the file). Lets one saved pass be expanded at several ratios or depths."""
    _check_expansion(ratio, max_depth, aggregate)
    cfg = model.cfg
    k = n_to_keep(ratio, cfg.n_layers * cfg.n_heads)
    heads_by_depth, tables, edges = expand(rel, k, max_depth, aggregate, total_effect=rel.scoring not in SCORERS)
    opts = {**(options or {}), "aggregate": aggregate, "target_position": "last", "max_depth": max_depth,
            "n_keep_per_depth": k}
    return Circuit(heads_by_depth, tables, edges, rel.scoring, ratio, model_info(model, checksum=True), opts,
                   unstable=rel.unstable)


def expand(rel: Relevance, k: int, max_depth: int, aggregate: Aggregate = "sum", *, total_effect: bool = False,
           ) -> tuple[tuple[tuple[Head, ...], ...], tuple[torch.Tensor, ...], tuple[Edge, ...]]:
    """Backward expansion over a relevance table whose targets are the logits (first) and, for
    ``max_depth > 0``, every head a kept head may be (``head_relevances(target="all")``).

    Returns the heads kept per depth, the depth tables and the edges (module docstring).
    ``total_effect``: the logits table holds total effects, so every depth ranks that one table.
    """
    if rel.targets[0] is not None:
        raise ValueError("the relevance table's first target must be the logits")
    mean = rel.mean  # [T, L, H]
    row = {t: i for i, t in enumerate(rel.targets)}
    kept: set[Head] = set()
    heads_by_depth: list[tuple[Head, ...]] = []
    tables: list[torch.Tensor] = []
    edges: list[Edge] = []
    for depth in range(max_depth + 1):
        best = None
        targets: tuple[Head | None, ...] = (None,)
        if depth == 0 or total_effect:
            table = mean[0]
        else:
            targets = tuple(h for h in heads_by_depth[-1] if h[0] > 0)
            if not targets:
                break
            missing = [t for t in targets if t not in row]
            if missing:
                raise ValueError(f"the relevance table has no target {missing[0]}: score with target='all'")
            per_target = mean[[row[t] for t in targets]]  # [T, L, H]
            _, best = per_target.nan_to_num(float("-inf")).max(0)
            table = per_target.nansum(0) if aggregate == "sum" else per_target.nan_to_num(float("-inf")).max(0).values
            table[per_target.isnan().all(0)] = float("nan")
        new = rank_heads(table, exclude=kept)[:k]
        if not new:
            break
        for head in new:
            t = targets[0] if best is None else targets[int(best[head])]
            edges.append(Edge(source=head, target=t, depth=depth, score=float(table[head])))
        kept.update(new)
        heads_by_depth.append(tuple(new))
        tables.append(table)
    return tuple(heads_by_depth), tuple(tables), tuple(edges)
