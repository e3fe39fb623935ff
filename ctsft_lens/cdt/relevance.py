"""Relevance of attention heads to a target, from their CD-T β at that target.

Two read-outs, the CD-T scorings of ``ctsft_lens.scoring.HEAD_SCORINGS`` (the one registry; one
scoring through it: ``scoring.head_relevance``), per example then averaged:

* ``"projection"``: ``⟨β, v_task⟩`` with ``v_task = W_U[:, y] - mean_{y' != y} W_U[:, y']`` (``y``
  the gold label's token, ``y'`` the other labels' tokens). β is taken at the last prompt
  position, after the final norm for the logits target, or at a target head's ``hook_result``.
  Signed: positive means the source pushes the logits toward the gold label. A model that caps its
  logits (Gemma 2) is read at the capped label logits instead (:class:`Readout`): the change of
  the logit difference that patching measures.
* ``"magnitude"``: the original CD-T's unsigned ``‖β‖₁ / ‖γ‖₁`` at the target (the full logit
  vector for the logits target).

Speed: one real forward per batch of examples; the sources of each layer then propagate
together as a ``[source, example]`` batch, chunked to a memory budget (``cdt.driver``, the loop
``explore`` and the rule benchmark walk too). With a fully linear rule
set (``cdt.rules``: ``Rules.linear``) β is the derivative of the network along ``a − μ``, so the
projection score against the logits is ``Σ_pos (a − μ)·∂m/∂a`` with ``m = ⟨final-normed residual,
v_task⟩``: every source comes from **one backward pass** (:func:`linear_projection`), tested
equal to the per-source propagation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float

from ctsft_lens import distributed
from ctsft_lens.batching import batches, check_examples, length_order
from ctsft_lens.cdt.driver import Chunk, by_layer, forwards
from ctsft_lens.cdt.health import BETA_LIMIT, Health, recon_tol, report_unstable
from ctsft_lens.cdt.propagate import head_output, label_logits, propagate, source_positions, unembed
from ctsft_lens.cdt.rules import DEFAULT_PRESET, PRESETS, Rules
from ctsft_lens.cdt.split import Source, Split
from ctsft_lens.metrics import logit_diff
from ctsft_lens.options import BASELINES, STREAMS, Baseline, Streams, check, check_distinct
from ctsft_lens.models.architectures import soft_caps
from ctsft_lens.progress import progress_bar
from ctsft_lens.circuit import Head
from ctsft_lens.forward import hook_layer, run
from ctsft_lens.means import head_means, z_means
from ctsft_lens.tasks.base import Example


@dataclass(frozen=True)
class Relevance:
    """Scores of every head for every target; NaN where a head is not a source for that target.

    ``targets[t]`` is a head ``(layer, head)`` or ``None`` for the logits.
    """

    targets: tuple[Head | None, ...]
    per_example: Float[torch.Tensor, "target example n_layers n_heads"]
    scoring: str
    unstable: tuple[Head, ...] = ()  # sources with non-finite β/γ or β+γ off the forward (named in a warning)
    recon_error: Float[torch.Tensor, "n_layers n_heads"] | None = None  # worst relative β+γ error, checked hooks

    @property
    def mean(self) -> Float[torch.Tensor, "target n_layers n_heads"]:
        """Average over examples."""
        return self.per_example.mean(1)


def task_directions(model: Any, label_token_ids: torch.Tensor) -> Float[torch.Tensor, "n_labels d_model"]:
    """``v_task`` for each gold label: its unembedding minus the mean of the other labels'."""
    cols = model.W_U[:, label_token_ids.to(model.W_U.device)].T  # [n_labels, d]
    n = cols.shape[0]
    others = (cols.sum(0, keepdim=True) - cols) / max(n - 1, 1)
    return (cols - others).detach()


@dataclass(frozen=True)
class Readout:
    """What the read-outs see per example: ``direction`` = v_task ``[B, d]`` and the rule set; on a
    model with final-logit soft-capping (Gemma 2) the logits target reads the label logits through
    the cap instead (``capped``, under the rule set's activation and bias rules), so that the
    projection is the change of the capped logit difference that patching measures (without a cap
    the two are the same number)."""

    direction: Float[torch.Tensor, "batch d_model"]
    label_token_ids: torch.Tensor
    labels: torch.Tensor
    rules: Rules
    capped: bool = False


def readout(model: Any, batch: Any, rules: Rules) -> Readout:
    """The :class:`Readout` of one batch under ``rules``."""
    labels = batch.labels.to(model.cfg.device)
    return Readout(task_directions(model, batch.label_token_ids)[labels], batch.label_token_ids, labels, rules,
                   soft_caps(model)[1] is not None)


def capped_logit_diff(model: Any, x: Split, r: Readout) -> torch.Tensor:
    """β of the capped gold-minus-other-labels logit difference, from β/γ at the final norm ``[..., B, d]``."""
    lab = label_logits(model, x, r.label_token_ids, r.rules).beta.float()
    return logit_diff(lab, r.labels.expand(*lab.shape[:-1]))


def projection(x: Split, model: Any, logits: bool, r: Readout) -> torch.Tensor:
    """``⟨β, v_task⟩`` at the target vector (the final-normed residual for the logits target)."""
    if logits and r.capped:
        return capped_logit_diff(model, x, r)
    return (x.beta.float() * r.direction.float()).sum(-1)  # the reduction in float32, whatever the model dtype


def magnitude(x: Split, model: Any, logits: bool, r: Readout) -> torch.Tensor:
    """``‖β‖₁ / ‖γ‖₁`` at the target (the full logit vector for the logits target)."""
    if logits:
        x = unembed(model, x, r.rules)
    return x.beta.float().abs().sum(-1) / x.gamma.float().abs().sum(-1)


_READOUTS: dict[str, Callable[[Split, Any, bool, Readout], torch.Tensor]] = {"projection": projection,
                                                                             "magnitude": magnitude}
"""How each CD-T scoring of ``ctsft_lens.scoring.HEAD_SCORINGS`` (the one registry) reads β at a target:
``(split target [source, batch, d], model, is_logits, readout) -> [source, batch]``."""


def _cdt_only(scorings: Sequence[str]) -> tuple[str, ...]:
    scorings = tuple(scorings)
    check_distinct("scorings", scorings, error=ValueError)
    for name in scorings:
        if name not in _READOUTS:
            raise ValueError(f"scoring {name!r} is not a CD-T scoring; these share a pass: {', '.join(_READOUTS)} "
                             "(every scoring: ctsft_lens.scoring.head_relevance)")
    return scorings


@torch.no_grad()
def head_relevances(
    model: Any,
    examples: Sequence[Example],
    *,
    rules: Rules = PRESETS[DEFAULT_PRESET],
    scorings: Sequence[str] = tuple(_READOUTS),
    target: Literal["logits", "all"] | Sequence[Head] = "logits",
    sources: Sequence[Head] | None = None,
    reference: Sequence[Example] | None = None,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    baseline: Baseline = "mean",
    positions: tuple[int, ...] | None = None,
    streams: Streams = "beta",
    strict: bool = True,
    batch_size: int = 8,
    memory_gb: float | None = None,
    progress: bool = True,
) -> dict[str, Relevance]:
    """CD-T relevance of every head upstream of ``target`` (the logits, each listed head, or ``"all"``:
    the logits then every head of layers 1.. in order, as discovery reads all depths from), for
    each CD-T scoring in ``scorings`` from **one** propagation (they differ only in how they read β
    and γ at the target, so projection and magnitude together cost what one costs).

    ``rules``: the CD-T rule set, a :class:`~ctsft_lens.cdt.rules.Rules` (``cdt.rules.resolve`` reads a
    rule-set string; default: the ``DEFAULT_PRESET``). The other options are plain values: the
    fields of the same name of the discovery options, which the scoring registry
    (``ctsft_lens.scoring``) unpacks from a ``DiscoveryConfig`` into these arguments.
    ``sources`` restricts the heads scored (default: all heads upstream of some target);
    ``positions`` limits each source to those prompt tokens (negative from the end; default all).
    ``baseline="mean"`` subtracts each source head's label-balanced mean output over
    ``reference`` (default: ``examples``), or uses ``means`` if given; ``"zero"`` subtracts nothing.
    ``memory_gb`` bounds the ``[source, example]`` chunks propagated at once (default: 70 % of the
    free CUDA memory on a GPU, 2 GiB elsewhere). Scores are reduced in float32 in any model dtype.
    A source whose β/γ goes non-finite or leaves the real forward, or whose score is not finite,
    raises :class:`~ctsft_lens.cdt.health.UnstableDecompositionError` naming it if ``strict``;
    otherwise a warning names it and ``Relevance.unstable`` lists it. ``streams``: the β-only
    fast path (default) or the two-stream reference ``"both"`` (same scores to float rounding).
    One scoring, any of the registry's: ``ctsft_lens.scoring.head_relevance``.
    """
    scorings = _cdt_only(scorings)
    if not isinstance(rules, Rules):
        raise TypeError(f"rules must be a cdt.rules.Rules (cdt.rules.resolve reads a rule-set string), got {rules!r}")
    check("baseline", baseline, BASELINES, error=ValueError)
    check("streams", streams, STREAMS, error=ValueError)
    check_examples(examples)
    cfg = model.cfg
    targets: tuple[Head | None, ...]
    if isinstance(target, str):
        if target not in ("logits", "all"):
            raise ValueError(f"target must be 'logits', 'all' or a list of (layer, head), got {target!r}")
        targets, top = (None,), cfg.n_layers
        if target == "all":  # the logits and every head with a head upstream: all expansion depths at once
            targets += tuple((layer, head) for layer in range(1, cfg.n_layers) for head in range(cfg.n_heads))
    else:
        targets = tuple((int(layer), int(head)) for layer, head in target)
        if not targets:
            raise ValueError("empty list of target heads")
        for layer, head in targets:
            if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
                raise ValueError(f"target head {layer}.{head} is outside the model")
        top = max(layer for layer, _ in targets)
    if sources is None:
        sources = [(layer, head) for layer in range(top) for head in range(cfg.n_heads)]
    sources = [(int(layer), int(head)) for layer, head in sources]
    bad = [s for s in sources if not (0 <= s[0] < top and 0 <= s[1] < cfg.n_heads)]
    if bad:
        raise ValueError(f"source heads {bad} are not upstream of any target")
    if baseline == "mean" and means is None:
        means = head_means(model, reference if reference is not None else examples,
                           batch_size=batch_size, progress=progress)
    if baseline == "zero":
        means = None

    # batches of similar length (little padding), the same on every rank; results go back to the given order
    order = length_order(model, examples)
    local, index = distributed.shard([examples[i] for i in order], batch_size)  # under torchrun: whole batches
    index = [order[i] for i in index]
    per_example = {name: torch.full((len(targets), len(local), cfg.n_layers, cfg.n_heads), float("nan"))
                   for name in scorings}
    recon = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    healthy = torch.ones(cfg.n_layers, cfg.n_heads, dtype=torch.bool)  # finite and |β| within BETA_LIMIT
    stop = None if targets[0] is None else top
    n_batches = (len(local) + batch_size - 1) // batch_size
    bar = progress_bar(total=n_batches * len(sources), disable=not progress, desc="CD-T relevance", unit="head",
                       leave=False)
    # fully linear rules against the logits: one backward pass gives every source (module docstring)
    one_backward = rules.linear and targets == (None,) and scorings == ("projection",) and streams == "beta"
    if one_backward:
        start = 0
        mu_z = z_means(model, means) if means is not None and local else None  # once: a pseudo-inverse per head
        for batch in batches(model, local, batch_size) if local else ():
            n = batch.input_ids.shape[0]
            table = linear_projection(model, batch, means, positions, mu_z=mu_z)  # [B, L, H]
            for layer, heads in by_layer(sources).items():
                per_example["projection"][0, start:start + n, layer, heads] = table[:, layer, heads].float()
                healthy[layer, heads] &= table[:, layer, heads].isfinite().all(0)
            bar.update(len(sources))
            start += n
    else:
        for fwd in forwards(model, local, sources, batch_size=batch_size, memory_gb=memory_gb, positions=positions,
                            streams=streams, means=means, rules=rules, stop_layer=stop):
            reads = readout(model, fwd.batch, rules)
            rows = slice(fwd.start, fwd.start + fwd.n)
            for chunk in fwd.chunks():
                part = chunk.heads
                scores, health = _relevance_chunk(model, chunk, targets, scorings, reads)
                recon[chunk.layer, part] = torch.maximum(recon[chunk.layer, part], health.recon)
                healthy[chunk.layer, part] &= health.finite & (health.beta_scale <= BETA_LIMIT)
                for (name, t), s in scores.items():  # s: [S, B]
                    per_example[name][t, rows, chunk.layer, part] = s.T.float().cpu()
                bar.update(len(part))
    bar.close()
    per_example = {name: distributed.gather_examples(table, index, len(examples), dim=1)  # original order, all ranks
                   for name, table in per_example.items()}
    distributed.all_reduce_max(recon)  # over ranks: the worst error, and healthy only where every rank saw it so
    healthy = distributed.all_reduce_sum((~healthy).double()) == 0
    scored = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
    for layer, head in sources:
        scored[layer, head] = True
    layer_ids = torch.arange(cfg.n_layers)[:, None]
    upstream = torch.stack([scored & (layer_ids < (cfg.n_layers if t is None else t[0])) for t in targets])
    shaky = scored & (~healthy | ~(recon <= recon_tol(model)))
    unstable: dict[str, tuple[Head, ...]] = {}
    for name, table in per_example.items():
        nonfinite = (upstream & ~table.isfinite().all(1)).any(0)  # a score that should exist is NaN/inf
        unstable[name] = tuple((int(layer), int(head)) for layer, head in (shaky | (scored & nonfinite)).nonzero().tolist())
    report_unstable(tuple(sorted({h for heads in unstable.values() for h in heads})), rules, strict)
    return {name: Relevance(targets, per_example[name], name, unstable[name], recon.float()) for name in scorings}


def _relevance_chunk(
    model: Any, chunk: Chunk, targets: tuple[Head | None, ...], scorings: tuple[str, ...], reads: Readout,
) -> tuple[dict[tuple[str, int], torch.Tensor], Health]:
    """Scores ``{(scoring, target index): [source, batch]}`` of one chunk's sources, and their health."""
    out: dict[tuple[str, int], torch.Tensor] = {}
    target_layers = {t[0] for t in targets if t is not None}

    def visit(name: str, x: Split) -> None:
        if name == "ln_final.hook_out" and targets[0] is None:
            last = Split(x.beta[:, :, -1], x.gamma[:, :, -1])
            for scoring in scorings:
                out[scoring, 0] = _READOUTS[scoring](last, model, True, reads)
        elif name.endswith(".attn.hook_z") and hook_layer(name) in target_layers:
            z_layer = hook_layer(name)
            last = Split(x.beta[:, :, -1], x.gamma[:, :, -1])
            for t, tgt in enumerate(targets):
                if tgt is not None and tgt[0] == z_layer:
                    at = head_output(model, z_layer, tgt[1], last)
                    for scoring in scorings:
                        out[scoring, t] = _READOUTS[scoring](at, model, False, reads)

    health = chunk.propagate(visit, via=propagate)  # this module's binding: tests count the passes through it
    return out, health


def linear_projection(model: Any, batch: Any, means: torch.Tensor | None,
                      positions: tuple[int, ...] | None = None, *,
                      mu_z: torch.Tensor | None = None) -> Float[torch.Tensor, "batch n_layers n_heads"]:
    """Projection scores of every head under fully linear CD-T rules, from one forward and one backward.

    With every rule the derivative's, β at the final norm is the directional derivative along the
    sources' ``a − μ``, so ``⟨β, v_task⟩ = Σ_pos (z − μ^z)·∂m/∂z`` at ``hook_z`` with
    ``m = ⟨ln_final.hook_out[-1], v_task⟩`` (``μ^z``: the means in z space, ``means.z_means``);
    ``positions`` keep only those source tokens; ``mu_z``: ``z_means(model, means)`` computed once
    by a caller that loops over batches. Equal to the per-source propagation (tested).
    """
    cfg = model.cfg
    device = cfg.device
    n_layers = int(cfg.n_layers)
    if mu_z is None and means is not None:
        mu_z = z_means(model, means)
    mu = (mu_z.to(device) if mu_z is not None else
          torch.zeros(n_layers, int(cfg.n_heads), int(cfg.d_head), device=device))
    mask = batch.attention_mask.to(device)
    where = source_positions([Source(0, 0, positions)], mask)[0].to(torch.float32)[:, :, None]  # [B, pos, 1]
    reads = readout(model, batch, PRESETS["exact"])  # m itself: the capped logit difference (cap(0) = 0 aside)
    leaves: dict[int, torch.Tensor] = {}
    clean: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def at_z(z: torch.Tensor, hook: Any) -> torch.Tensor:
        layer = hook_layer(hook.name)
        clean[layer] = z.detach()
        leaves[layer] = torch.zeros_like(z, requires_grad=True)
        return z + leaves[layer]

    def at_final(x: torch.Tensor, hook: Any) -> torch.Tensor:
        final.append(x)
        return x

    hooks = [(f"blocks.{layer}.attn.hook_z", at_z) for layer in range(n_layers)] + [("ln_final.hook_out", at_final)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        run(model, batch, last_only=True)
        last = final[0][:, -1]
        m = (capped_logit_diff(model, Split(last, torch.zeros_like(last)), reads) if reads.capped
             else (last.float() * reads.direction.float()).sum(-1)).sum()
        grads = torch.autograd.grad(m, [leaves[layer] for layer in range(n_layers)])
    out = torch.stack([(((clean[layer] - mu[layer].to(g.dtype)) * g).sum(-1) * where).sum(1)
                       for layer, g in enumerate(grads)], 1)  # [B, L, H]
    return out.detach().cpu()
