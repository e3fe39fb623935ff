"""Circuit discovery for every head scoring: score with the registry (``ctsft_lens.scoring``), then
backward expansion (``scoring.expansion``). Also reachable as ``ctsft_lens.discover``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ctsft_lens.batching import check_examples
from ctsft_lens.cdt.rules import resolve
from ctsft_lens.circuit import Circuit
from ctsft_lens.options import check_distinct
from ctsft_lens.means import head_means
from ctsft_lens.scoring import (HEAD_SCORINGS, DiscoveryConfig, check_scoring, circuit_from_relevance,
                                discovery_config, relevances)
from ctsft_lens.tasks.base import Example


@torch.no_grad()
def discover(model: Any, examples: Sequence[Example], config: DiscoveryConfig | None = None, *,
             reference: Sequence[Example] | None = None, batch_size: int = 8, memory_gb: float | None = None,
             progress: bool = True, **options: Any) -> Circuit:
    """Find a circuit of attention heads by head relevance and iterative backward expansion.

    The options are the fields of ``config`` (:class:`~ctsft_lens.scoring.DiscoveryConfig`);
    keyword ``options`` override them (``scoring=``, ``ratio=``, ``max_depth=``...).
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
    All depths come from one CD-T propagation (``scoring.expansion``); :func:`discover_circuits` gives
    several scorings from that one pass.
    """
    config = discovery_config(config, **options)
    return discover_circuits(model, examples, config, scorings=(config.scoring,), reference=reference,
                             batch_size=batch_size, memory_gb=memory_gb, progress=progress)[config.scoring]


@torch.no_grad()
def discover_circuits(model: Any, examples: Sequence[Example], config: DiscoveryConfig | None = None, *,
                      scorings: Sequence[str] | None = None, reference: Sequence[Example] | None = None,
                      batch_size: int = 8, memory_gb: float | None = None, progress: bool = True,
                      **options: Any) -> dict[str, Circuit]:
    """:func:`discover` for several scorings (default: ``config.scoring``), keyed by scoring; the CD-T
    ones share one propagation, so projection and magnitude at depths 0..D cost one CD-T pass.
    Same options and checks as :func:`discover`."""
    config = discovery_config(config, **options)
    scorings = tuple(scorings) if scorings is not None else (config.scoring,)
    check_distinct("scorings", scorings)
    for name in scorings:
        check_scoring(name)
    rules = resolve(config.decomposition)
    check_examples(examples)
    ref = reference if reference is not None else examples
    means = head_means(model, ref, batch_size=batch_size, progress=progress) if config.baseline == "mean" else None
    run = dict(means=means, batch_size=batch_size, memory_gb=memory_gb, progress=progress)
    cdt = tuple(s for s in scorings if HEAD_SCORINGS[s].cdt)
    rels = {}
    if cdt:  # the logits and every head as targets: all depths from one pass
        rels = relevances(model, examples, config, scorings=cdt, target="all" if config.max_depth > 0 else "logits",
                          **run)
    rest = tuple(s for s in scorings if s not in rels)
    if rest:  # total effect: one logits table each
        rels.update(relevances(model, examples, config, scorings=rest, **run))
    recorded = {"baseline": config.baseline, "attention": rules.attention,  # the two rules of older files, kept
                "decomposition": rules.spec(), "bias_o": rules.bias_o or rules.bias,
                "streams": config.streams, "n_examples": len(examples),
                "n_reference": len(ref) if config.baseline == "mean" else 0, "mean_positions": "pooled",
                "source_positions": None if config.positions is None else list(config.positions)}
    return {name: circuit_from_relevance(model, rels[name], config, options={**recorded, "ig_steps": config.ig_steps}
                                         if name == "attribution-ig" else recorded)
            for name in scorings}
