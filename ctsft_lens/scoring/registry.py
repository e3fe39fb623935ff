"""Every head scoring: one registry, one signature.

``HEAD_SCORINGS[name].score(model, examples, config, metric, **run)`` gives a
:class:`~ctsft_lens.cdt.relevance.Relevance`, the per-example head tables ``[target, example,
n_layers, n_heads]``, for CD-T's ``projection`` and ``magnitude`` (``cdt.relevance``) and the
total-effect scorings ``attribution``, ``attribution-ig``, ``attribution-verified`` and ``patching``
(``total_effect``, ``pattern_attribution``). ``config`` is the
:class:`~ctsft_lens.scoring.config.DiscoveryConfig` (each scoring reads the fields it uses; for CD-T
:func:`cdt_options` unpacks it into the rule set and plain values ``cdt/`` takes), ``metric`` the
task metric of the total-effect scorings (CD-T has none: it reads β at the logits); ``run`` holds
how to run it (``target``, ``sources``, ``reference``, ``means``, ``batch_size``, ``memory_gb``,
``progress``).

This module sits above ``cdt/`` and ``total_effect``, and neither imports it: the ``--scoring``
and ``compare --method`` choices, the TOML check of ``discovery.scoring``, :func:`head_relevance`,
discovery (``ctsft_lens.discovery``) and ``compare`` all read this one dict, so every scoring is valid
everywhere and a new scoring is one entry (a CD-T one also its read-out in ``cdt.relevance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float

from ctsft_lens.cdt.relevance import Relevance, head_relevances
from ctsft_lens.cdt.rules import resolve
from ctsft_lens.circuit import Head
from ctsft_lens.errors import CtsftError
from ctsft_lens.metrics import Metric
from ctsft_lens.means import head_means
from ctsft_lens.options import check, check_distinct
from ctsft_lens.scoring.config import DiscoveryConfig, discovery_config
from ctsft_lens.scoring.total_effect import attribution_per_example, patching_per_example
from ctsft_lens.scoring.pattern_attribution import pattern_attribution_per_example
from ctsft_lens.tasks.base import Example

Target = Literal["logits", "all"] | Sequence[Head]
Scorer = Callable[..., Relevance]
"""``(model, examples, config, metric=None, *, target, sources, reference, means, batch_size, memory_gb,
progress) -> Relevance``."""


@dataclass(frozen=True)
class HeadScoring:
    """One head scoring: ``score`` (the module's signature); ``cdt``: a CD-T readout (several share one
    propagation, and they score against head targets too, for backward expansion)."""

    name: str
    score: Scorer
    cdt: bool
    cost: str
    help: str

    def per_example(self, model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                    batch_size: int = 8, progress: bool = True, heads: Sequence[Head] | None = None,
                    metric: Metric | None = None, **options: Any) -> Float[torch.Tensor, "example n_layers n_heads"]:
        """The ``[n, L, H]`` table against the logits; ``options``: fields of ``DiscoveryConfig``."""
        config = discovery_config(None, scoring=self.name, **options)
        return self.score(model, examples, config, metric, means=means, sources=heads, batch_size=batch_size,
                          progress=progress).per_example[0]


def cdt_options(config: DiscoveryConfig) -> dict[str, Any]:
    """The discovery options CD-T reads, as ``cdt.relevance.head_relevances`` takes them: the rule set
    (``decomposition`` resolved, once) and the plain values ``baseline``, ``positions``, ``streams``,
    ``strict``."""
    return dict(rules=resolve(config.decomposition), baseline=config.baseline, positions=config.positions,
                streams=config.streams, strict=config.strict)


def _cdt(name: str) -> Scorer:
    def score(model: Any, examples: Sequence[Example], config: DiscoveryConfig, metric: Metric | None = None,
              **run: Any) -> Relevance:
        if metric is not None:
            raise CtsftError(f"scoring {name!r} is a CD-T scoring: it has no metric option")
        return head_relevances(model, examples, scorings=(name,), **cdt_options(config), **run)[name]
    return score


def _pattern_attribution(model: Any, examples: Sequence[Example], config: DiscoveryConfig,
                         **kw: Any) -> torch.Tensor:
    return pattern_attribution_per_example(model, examples, verify_top=config.verify_top,
                                           verify_flag=config.verify_flag, verify_sink=config.verify_sink,
                                           heads_per_forward=config.heads_per_forward, **kw)


def _total_effect(name: str, table: Callable[..., torch.Tensor]) -> Scorer:
    """A total-effect scoring: the logits are its only target; the ``"zero"`` baseline takes μ = 0;
    ``sources`` restricts the heads scored; CD-T's rules and source positions do not apply."""
    def score(model: Any, examples: Sequence[Example], config: DiscoveryConfig, metric: Metric | None = None, *,
              target: Target = "logits", sources: Sequence[Head] | None = None,
              reference: Sequence[Example] | None = None, means: torch.Tensor | None = None, batch_size: int = 8,
              memory_gb: float | None = None, progress: bool = True) -> Relevance:
        if not (isinstance(target, str) and target == "logits"):
            raise CtsftError(f"scoring {name!r} scores heads against the logits only (its score already counts "
                             "every path through later heads); head targets are for the CD-T scorings "
                             f"{' and '.join(n for n, s in HEAD_SCORINGS.items() if s.cdt)}")
        if config.positions is not None:
            raise CtsftError(f"scoring {name!r} intervenes at every position; source positions are a CD-T option")
        if config.baseline == "zero":
            cfg = model.cfg
            means = torch.zeros(int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_model))
        elif means is None:
            means = head_means(model, reference if reference is not None else examples, batch_size=batch_size,
                               progress=progress)
        per = table(model, examples, config, means=means, heads=sources, metric=metric, batch_size=batch_size,
                    progress=progress)
        return Relevance((None,), per[None], name)
    return score


HEAD_SCORINGS: dict[str, HeadScoring] = {
    "projection": HeadScoring("projection", _cdt("projection"), True, "one forward + CD-T propagation of every head",
                              "CD-T β of each head projected on the task direction at the logits (CT-SFT)"),
    "magnitude": HeadScoring("magnitude", _cdt("magnitude"), True, "one forward + CD-T propagation of every head",
                             "CD-T ‖β‖₁/‖γ‖₁ at the logits (original CD-T, unsigned)"),
    "attribution": HeadScoring(
        "attribution", _total_effect("attribution", lambda model, ex, config, **kw: attribution_per_example(
            model, ex, **kw)), False, "1 forward + 1 backward",
        "attribution patching: (μ − z)·∂m/∂z at each head's hook_z"),
    "attribution-ig": HeadScoring(
        "attribution-ig", _total_effect("attribution-ig", lambda model, ex, config, **kw: attribution_per_example(
            model, ex, ig_steps=config.ig_steps, **kw)), False, "1 forward + ig_steps x (forward + backward)",
        "integrated gradients of m on the straight line μ → z, --ig-steps midpoint steps"),
    "attribution-verified": HeadScoring(
        "attribution-verified", _total_effect("attribution-verified", _pattern_attribution), False,
        "1 forward + 1 backward + per-head corrections + exact patching of the verified heads",
        "attribution with each head's own MLP and every later attention pattern recomputed exactly, then exact "
        "patching of the --verify-top heads and of those whose correction is large"),
    "patching": HeadScoring(
        "patching", _total_effect("patching", lambda model, ex, config, **kw: patching_per_example(
            model, ex, heads_per_forward=config.heads_per_forward, **kw)), False,
        "1 forward + n_heads / heads_per_forward forwards of k x batch",
        "exact effect m(clean) − m(head ← μ), one head at a time"),
}
"""Every head scoring by name: ``--scoring`` / ``--method`` choices, ``discovery.scoring``, discovery, compare."""


def check_scoring(name: str) -> None:
    """One clear error for a scoring that is not in the registry."""
    check("scoring", name, tuple(HEAD_SCORINGS))


def relevances(model: Any, examples: Sequence[Example], config: DiscoveryConfig | None = None, *,
               scorings: Sequence[str] | None = None, target: Target = "logits", metric: Metric | None = None,
               **run: Any) -> dict[str, Relevance]:
    """Several scorings (default: ``config.scoring``) of the same examples, keyed by scoring; the CD-T
    ones share one propagation. ``run``: ``sources``, ``reference``, ``means``, ``batch_size``,
    ``memory_gb``, ``progress``."""
    config = config if config is not None else DiscoveryConfig()
    scorings = tuple(scorings) if scorings is not None else (config.scoring,)
    check_distinct("scorings", scorings)
    for name in scorings:
        check_scoring(name)
    shared = tuple(s for s in scorings if HEAD_SCORINGS[s].cdt)
    out: dict[str, Relevance] = {}
    if shared:
        if metric is not None:
            raise CtsftError(f"scoring {shared[0]!r} is a CD-T scoring: it has no metric option")
        out.update(head_relevances(model, examples, scorings=shared, target=target, **cdt_options(config), **run))
    for name in scorings:
        if name not in out:
            out[name] = HEAD_SCORINGS[name].score(model, examples, config, metric, target=target, **run)
    return {name: out[name] for name in scorings}


def head_relevance(model: Any, examples: Sequence[Example], config: DiscoveryConfig | None = None, *,
                   target: Target = "logits", sources: Sequence[Head] | None = None,
                   reference: Sequence[Example] | None = None, means: torch.Tensor | None = None,
                   batch_size: int = 8, memory_gb: float | None = None, progress: bool = True,
                   metric: Metric | None = None, **options: Any) -> Relevance:
    """Relevance of every head by ``config.scoring``, any scoring of ``HEAD_SCORINGS`` (keyword
    ``options``: fields of :class:`~ctsft_lens.scoring.config.DiscoveryConfig` overriding
    ``config``): the one way to score heads. CD-T scorings: see ``cdt.relevance.head_relevances``
    (head targets, source positions, the rule set...); the total-effect ones score against the
    logits only."""
    config = discovery_config(config, **options)
    check_scoring(config.scoring)
    return HEAD_SCORINGS[config.scoring].score(model, examples, config, metric, target=target, sources=sources,
                                               reference=reference, means=means, batch_size=batch_size,
                                               memory_gb=memory_gb, progress=progress)


def head_scores(model: Any, examples: Sequence[Example], scoring: str, *, means: torch.Tensor | None = None,
                batch_size: int = 8, progress: bool = True, **options: Any) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Any scoring of ``HEAD_SCORINGS`` against the logits, averaged over examples: ``[n_layers, n_heads]``.

    ``options``: ``heads`` (restrict the heads scored; not for CD-T), ``metric``, and any field of
    ``DiscoveryConfig`` (``ig_steps``, ``heads_per_forward``, ``baseline``, ``decomposition``...).
    """
    check_scoring(scoring)
    return HEAD_SCORINGS[scoring].per_example(model, examples, means=means, batch_size=batch_size,
                                              progress=progress, **options).mean(0)


def total_effect_relevance(model: Any, examples: Sequence[Example], scoring: str, *, target: Any = "logits",
                           sources: Sequence[Head] | None = None, reference: Sequence[Example] | None = None,
                           means: torch.Tensor | None = None, batch_size: int = 8, progress: bool = True,
                           metric: Metric | None = None, **options: Any) -> Relevance:
    """:func:`head_relevance` for a scoring that is not CD-T's (attribution, attribution-ig, patching)."""
    if scoring not in HEAD_SCORINGS or HEAD_SCORINGS[scoring].cdt:
        raise CtsftError(f"{scoring!r} is not a total-effect scoring; choose from "
                         f"{tuple(k for k, v in HEAD_SCORINGS.items() if not v.cdt)}")
    return head_relevance(model, examples, scoring=scoring, target=target, sources=sources, reference=reference,
                          means=means, batch_size=batch_size, progress=progress, metric=metric, **options)
