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

Scoring then expanding, for every scoring of the registry: ``ctsft_lens.discovery.discover`` (a
floor above this package); this module expands a table already scored.
"""

from __future__ import annotations

from typing import Any

import torch

from ctsft_lens.cdt.relevance import Relevance
from ctsft_lens.circuit import Circuit, Edge, Head, rank_heads
from ctsft_lens.models.bridge import model_info
from ctsft_lens.options import Aggregate, Select
from ctsft_lens.scoring.config import DiscoveryConfig, discovery_config
from ctsft_lens.scoring.registry import HEAD_SCORINGS, check_scoring


def n_to_keep(ratio: float, n_heads_total: int) -> int:
    """Heads kept per depth: ``floor(ratio * all heads)``, at least one."""
    return max(1, int(ratio * n_heads_total))


def circuit_from_relevance(model: Any, rel: Relevance, config: DiscoveryConfig | None = None, *,
                           options: dict[str, Any] | None = None, **overrides: Any) -> Circuit:
    """The circuit of a relevance table already scored (``head_relevances(target="all")`` for
    depths > 0): :func:`expand` at ``config``'s ``ratio``, ``max_depth`` and ``aggregate`` (keyword
    ``overrides`` change them), plus the model's fingerprint and ``options`` (how ``rel`` was
    scored, recorded in the file). Lets one saved pass be expanded at several ratios or depths."""
    config = discovery_config(config, **overrides)
    ratio, max_depth, aggregate = config.ratio, config.max_depth, config.aggregate
    check_scoring(rel.scoring)
    cfg = model.cfg
    k = n_to_keep(ratio, cfg.n_layers * cfg.n_heads)
    heads_by_depth, tables, edges = expand(rel, k, max_depth, aggregate,
                                           total_effect=not HEAD_SCORINGS[rel.scoring].cdt, select=config.select)
    opts = {**(options or {}), "aggregate": aggregate, "target_position": "last", "max_depth": max_depth,
            "n_keep_per_depth": k, "select": config.select}
    return Circuit(heads_by_depth, tables, edges, rel.scoring, ratio, model_info(model, checksum=True), opts,
                   unstable=rel.unstable)


def expand(rel: Relevance, k: int, max_depth: int, aggregate: Aggregate = "sum", *, total_effect: bool = False,
           select: Select = "positive") -> tuple[tuple[tuple[Head, ...], ...], tuple[torch.Tensor, ...], tuple[Edge, ...]]:
    """Backward expansion over a relevance table whose targets are the logits (first) and, for
    ``max_depth > 0``, every head a kept head may be (``head_relevances(target="all")``).

    Returns the heads kept per depth, the depth tables and the edges (module docstring).
    ``total_effect``: the logits table holds total effects, so every depth ranks that one table.
    ``select``: ``"positive"`` adds at most ``k`` heads whose score is > 0, largest first (a head
    that works against its target never enters because a quota must be filled; a depth with fewer
    positive candidates adds fewer, and one with none ends the search); ``"absolute"`` ranks by
    |score|.
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
        ranked = rank_heads(table, absolute=select == "absolute", exclude=kept)
        if select == "positive":
            ranked = [h for h in ranked if float(table[h]) > 0]
        new = ranked[:k]
        if not new:
            break
        for head in new:
            t = targets[0] if best is None else targets[int(best[head])]
            edges.append(Edge(source=head, target=t, depth=depth, score=float(table[head])))
        kept.update(new)
        heads_by_depth.append(tuple(new))
        tables.append(table)
    return tuple(heads_by_depth), tuple(tables), tuple(edges)
