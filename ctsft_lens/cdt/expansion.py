"""Iterative backward expansion: from the logits back through the heads that feed them.

Depth 0 scores every head against the logits and keeps the top ``ratio`` of all heads (at
least one). Depth ``d`` takes the heads kept at depth ``d - 1`` as targets, scores every head
in an earlier layer against each of them, combines those scores (``aggregate``: their sum, as
the public CD-T notebooks do, or their maximum) and adds the top ``ratio`` (of all heads) among
the heads not yet kept. The search stops early when no candidate is left.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ctsft_lens.batching import check_examples
from ctsft_lens.cdt.decompose import DEFAULT_DECOMPOSITION, Decomposition, check_decomposition
from ctsft_lens.cdt.relevance import SCORERS, Scoring, check_options, head_relevance
from ctsft_lens.circuit import Circuit, Edge, Head, rank_heads
from ctsft_lens.means import head_means
from ctsft_lens.models.bridge import model_info
from ctsft_lens.options import AGGREGATES, AttentionRule, Aggregate, Baseline, check
from ctsft_lens.tasks.base import Example


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
    attention: AttentionRule = "cdt",
    aggregate: Aggregate = "sum",
    positions: tuple[int, ...] | None = None,
    reference: Sequence[Example] | None = None,
    batch_size: int = 8,
    memory_gb: float | None = None,
    progress: bool = True,
    ig_steps: int = 5,
    decomposition: Decomposition = DEFAULT_DECOMPOSITION,
    bias_o: str = "share",
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
    """
    check_options(scoring, baseline, attention)
    check("aggregate", aggregate, AGGREGATES)
    check_decomposition(decomposition)
    check_examples(examples)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    cfg = model.cfg
    k = n_to_keep(ratio, cfg.n_layers * cfg.n_heads)
    ref = reference if reference is not None else examples
    means = head_means(model, ref, batch_size=batch_size, progress=progress) if baseline == "mean" else None
    common = dict(scoring=scoring, baseline=baseline, attention=attention, positions=positions, means=means,
                  batch_size=batch_size, memory_gb=memory_gb, progress=progress, ig_steps=ig_steps,
                  decomposition=decomposition, bias_o=bias_o, strict=strict, streams=streams)
    unstable: set[Head] = set()

    kept: set[Head] = set()
    heads_by_depth: list[tuple[Head, ...]] = []
    tables: list[torch.Tensor] = []
    edges: list[Edge] = []
    for depth in tqdm(range(max_depth + 1), disable=not progress, desc="CD-T expansion", leave=False):
        if depth > 0 and scoring not in SCORERS:  # total effect: the next heads of the one logits table
            table, best, targets = tables[0], None, (None,)
        elif depth == 0:
            rel = head_relevance(model, examples, target="logits", **common)
            table, best = rel.mean[0], None
            targets: tuple[Head | None, ...] = (None,)
        else:
            targets = tuple(h for h in heads_by_depth[-1] if h[0] > 0)
            if not targets:
                break
            rel = head_relevance(model, examples, target=list(targets), **common)
            per_target = rel.mean  # [T, L, H]
            _, best = per_target.nan_to_num(float("-inf")).max(0)
            table = per_target.nansum(0) if aggregate == "sum" else per_target.nan_to_num(float("-inf")).max(0).values
            table[per_target.isnan().all(0)] = float("nan")
        unstable.update(rel.unstable)
        new = rank_heads(table, exclude=kept)[:k]
        if not new:
            break
        for head in new:
            t = targets[0] if best is None else targets[int(best[head])]
            edges.append(Edge(source=head, target=t, depth=depth, score=float(table[head])))
        kept.update(new)
        heads_by_depth.append(tuple(new))
        tables.append(table)
    options = {"baseline": baseline, "attention": attention, "aggregate": aggregate,
               "decomposition": decomposition, "bias_o": bias_o, "streams": streams, "n_examples": len(examples),
               "n_reference": len(ref) if baseline == "mean" else 0, "mean_positions": "pooled",
               "source_positions": None if positions is None else list(positions),
               "target_position": "last", "max_depth": max_depth, "n_keep_per_depth": k}
    if scoring == "attribution-ig":
        options["ig_steps"] = ig_steps
    return Circuit(tuple(heads_by_depth), tuple(tables), tuple(edges), scoring, ratio,
                   model_info(model, checksum=True), options, unstable=tuple(sorted(unstable)))
