"""Total-effect head scorings beside CD-T: attribution patching, its integrated-gradients form, and exact patching.

All three use the task metric of the faithfulness curves (``metrics.logit_diff``: the gold
label's logit minus the mean of the other labels' logits at the last prompt token) and the
label-balanced mean μ of ``means.head_means``, and score a head positive when it helps the gold
label. They score a head's *total* effect on the metric (every path from the head to the logits,
through later heads and MLPs).

The intervention point is each query head's ``blocks.L.attn.hook_z`` (``[batch, pos, head,
d_head]``; with GQA one slot per query head, no K/V ungrouping). A head's output is
``z_h W_O[h]`` (``hook_result`` has no bias), so the result-space mean μ_h of ``head_means`` is
``μ^z_h W_O[h]`` with ``μ^z_h = μ_h W_O[h]^+`` (:func:`z_means`, exact: μ_h lies in the row
space of ``W_O[h]``). Writing μ^z at ``hook_z`` is therefore the same intervention as writing μ
at ``hook_result`` (what mean ablation does), without the ``[batch, pos, head, d_model]``
per-head results.

Write ``F(δ)`` for the metric with ``δ_h`` added to head h's ``hook_z`` at every position, and
``Δ_h = μ^z_h − z_h`` (``z`` from the clean forward). Per example, summed over real positions,
with the sign that makes a helpful head positive (``m(clean) − m(patched)``):

* ``attribution``: ``−Δ_h · ∂F/∂δ_h`` at δ = 0 (the first-order estimate of the patching effect,
  i.e. ``(μ − z)·∂m/∂z`` negated) — one forward and one backward for every head;
* ``attribution-ig``: ``−Δ_h · mean_k ∂F/∂δ_h`` at δ = (1 − α_k) Δ, α_k = (k − ½)/steps — every
  head moves together on the straight line from μ to z (midpoint rule); one clean forward plus
  ``ig_steps`` forward + backward passes. Restricted to one head (``heads=[h]``) it converges to
  that head's patching effect; over all heads the scores sum to ``F(0) − F(Δ)`` (completeness);
* ``patching``: ``F(0) − F(Δ_h only)``, the exact effect of writing μ into head h alone: one
  clean forward plus one forward per head, ``heads_per_forward`` heads sharing a forward along
  the batch dimension. **Cached prefix** (issue #38, default): the blocks below a group's lowest
  layer compute exactly what the clean forward computed, so the clean forward records each
  block's output and the patched forward has those blocks return it instead of recomputing
  (:func:`_cached_prefix`): a head at layer l costs the (L − l)/L of a forward downstream of it.
  Generic over families: only the decoder layers' own ``forward`` is stood in for, the model's
  loop (embeddings, masks, rotary tables, final norm, head) runs as usual. The cached path also
  regroups each batch **by length** (``Batch.length_buckets``: at most 1/4 of a forward's
  positions are padding): in a left-padded batch of 8 NusaX prompts about half the positions are
  padding, which every patched forward would otherwise carry through every block; one forward per
  example would instead pay the weights' read for a few rows. ``cached_prefix=False`` recomputes
  every block on the padded batch (the previous path; same scores to float tolerance, tested).

These are the scoring functions; the one registry of every head scoring (CD-T's ``projection`` and
``magnitude`` and these three) is ``ctsft_lens.scoring.HEAD_SCORINGS`` (``registry.py``, beside
this module): nothing here imports CD-T or the registry.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float

from ctsft_lens.batching import Batch, batches, check_examples
from ctsft_lens.circuit import Head
from ctsft_lens.errors import CtsftError
from ctsft_lens.metrics import Metric, logit_diff
from ctsft_lens.forward import hook_name, run
from ctsft_lens.means import head_means, z_means
from ctsft_lens.progress import progress_bar
from ctsft_lens.tasks.base import Example



def head_table(model: Any, heads: Sequence[Head] | None) -> torch.Tensor:
    """Boolean ``[n_layers, n_heads]`` of the heads to score (all when ``heads`` is None)."""
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if heads is None:
        return torch.ones(n_layers, n_heads, dtype=torch.bool)
    table = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= int(layer) < n_layers and 0 <= int(head) < n_heads):
            raise CtsftError(f"head {layer}.{head} is outside the model ({n_layers} layers x {n_heads} heads)")
        table[int(layer), int(head)] = True
    return table


def prepare(model: Any, examples: Sequence[Example], means: torch.Tensor | None, batch_size: int,
            progress: bool) -> tuple[torch.Tensor, list[Batch]]:
    """μ at ``hook_z`` (:func:`z_means`; the examples' own head means when ``means`` is None) and the batches."""
    check_examples(examples)
    if batch_size < 1:
        raise CtsftError(f"batch_size must be >= 1, got {batch_size}")
    if means is None:
        means = head_means(model, examples, batch_size=batch_size, progress=progress)
    return z_means(model, means).to(model.cfg.device), list(batches(model, examples, batch_size))


def _metric(model: Any, batch: Batch, metric: Metric, fwd_hooks: list | None = None) -> torch.Tensor:
    """Per-example metric ``[batch]`` of one forward (hooks applied)."""
    with model.hooks(fwd_hooks=fwd_hooks or []):
        logits = run(model, batch, last_only=True)
    label = logits[:, -1, :][:, batch.label_token_ids.to(logits.device)]
    return metric(label, batch.labels.to(label.device))


def _gradient_effects(model: Any, batch: Batch, mu_z: torch.Tensor, alphas: Sequence[float],
                      select: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``−Δ_h · mean_α ∂F/∂δ_h`` at ``δ = (1 − α) Δ`` on the selected heads: ``[batch, n_layers, n_heads]``."""
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    names = [hook_name(layer, "attn.hook_z") for layer in range(n_layers)]
    device = cfg.device
    sel = select.to(device)
    real = batch.attention_mask.to(device).to(torch.float32)[:, :, None]  # [B, P, 1]
    clean: dict[int, torch.Tensor] = {}
    if any(a != 1.0 for a in alphas):
        with torch.no_grad():
            _, cache = run(model, batch, names=names, last_only=True)
        clean = {layer: cache[names[layer]].detach() for layer in range(n_layers)}
        del cache
    total = torch.zeros(batch.input_ids.shape[0], n_layers, int(cfg.n_heads), dtype=torch.float64)
    for alpha in alphas:
        leaves: dict[int, torch.Tensor] = {}

        def hook(z: torch.Tensor, hook: Any, alpha: float = alpha) -> torch.Tensor:
            layer = int(hook.name.split(".")[1])
            if layer not in clean:  # alpha == 1: this forward is the clean one
                clean[layer] = z.detach()
            leaf = torch.zeros_like(z, requires_grad=True)
            leaves[layer] = leaf
            if alpha == 1.0:
                return z + leaf
            shift = (1.0 - alpha) * (mu_z[layer].to(z.dtype) - clean[layer]) * sel[layer][None, None, :, None]
            return z + shift.detach() + leaf

        with torch.enable_grad():
            m = _metric(model, batch, metric, [(n, hook) for n in names])
            grads = torch.autograd.grad(m.sum(), [leaves[layer] for layer in range(n_layers)])
        for layer, g in enumerate(grads):
            away = clean[layer] - mu_z[layer].to(g.dtype)  # z − μ: [B, P, H, d_head]
            per_head = ((away * g).sum(-1) * real).sum(1)  # [B, H]
            total[:, layer] += (per_head * sel[layer]).double().cpu()
    return total / len(alphas)


def score_tables(per_batch: Callable[[Batch], torch.Tensor], batch_list: list[Batch], n_examples: int,
                 select: torch.Tensor, desc: str, progress: bool) -> torch.Tensor:
    """Per-example tables ``[example, n_layers, n_heads]``, NaN where a head was not scored."""
    rows = [per_batch(b) for b in progress_bar(batch_list, disable=not progress, desc=desc, leave=False)]
    out = torch.cat(rows).to(torch.float32) if rows else torch.zeros(0, *select.shape)
    assert out.shape[0] == n_examples
    return out.masked_fill(~select[None], float("nan"))


def attribution_per_example(model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                            heads: Sequence[Head] | None = None, ig_steps: int | None = None,
                            metric: Metric | None = None, batch_size: int = 8,
                            progress: bool = True) -> Float[torch.Tensor, "example n_layers n_heads"]:
    """``attribution`` (``ig_steps=None``) or ``attribution-ig`` scores of every example, ``[n, L, H]``."""
    if ig_steps is not None and (not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1):
        raise CtsftError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")
    mu_z, batch_list = prepare(model, examples, means, batch_size, progress)
    select = head_table(model, heads)
    alphas = [1.0] if ig_steps is None else [(k + 0.5) / ig_steps for k in range(ig_steps)]
    fn = metric or logit_diff
    return score_tables(lambda b: _gradient_effects(model, b, mu_z, alphas, select, fn), batch_list, len(examples),
                   select, "attribution" if ig_steps is None else f"attribution-ig ({ig_steps} steps)", progress)


def attribution_scores(model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                       heads: Sequence[Head] | None = None, metric: Metric | None = None, batch_size: int = 8,
                       progress: bool = True) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Attribution patching: ``(μ − z)·∂m/∂z`` at each head's ``hook_z``, summed over positions,
    averaged over examples; one forward and one backward per batch for every head."""
    return attribution_per_example(model, examples, means=means, heads=heads, metric=metric,
                                   batch_size=batch_size, progress=progress).mean(0)


def attribution_ig_scores(model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                          ig_steps: int = 5, heads: Sequence[Head] | None = None, metric: Metric | None = None,
                          batch_size: int = 8, progress: bool = True) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Integrated gradients on the straight line from μ to z (all heads in ``heads`` moving
    together), ``ig_steps`` midpoint steps; ``heads=[h]`` moves that head alone."""
    return attribution_per_example(model, examples, means=means, heads=heads, ig_steps=ig_steps, metric=metric,
                                   batch_size=batch_size, progress=progress).mean(0)


def _tile(value: Any, times: int) -> Any:
    """``value`` tiled ``times`` along the batch (as ``Tensor.repeat``); tuples and lists item by item."""
    if isinstance(value, torch.Tensor):
        return value if times == 1 else value.repeat(times, *([1] * (value.ndim - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, times) for v in value)
    return value


@contextlib.contextmanager
def _recorded_blocks(model: Any) -> Iterator[dict[int, Any]]:
    """Record what every decoder layer returns during the forwards run inside (the last one wins)."""
    outputs: dict[int, Any] = {}
    handles = [block.original_component.register_forward_hook(
        lambda module, args, out, k=k: outputs.__setitem__(k, out)) for k, block in enumerate(model.blocks)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _cached_prefix(model: Any, outputs: dict[int, Any], below: int, times: int) -> Iterator[None]:
    """Blocks ``0 .. below - 1`` return their recorded clean outputs (tiled ``times`` along the batch)
    instead of computing them; the blocks from ``below`` on run as usual."""
    stood_in = []
    for k in range(below):
        component = model.blocks[k].original_component
        stood_in.append(component)
        component.forward = lambda *args, _out=_tile(outputs[k], times), **kwargs: _out  # an instance attribute
    try:
        yield
    finally:
        for component in stood_in:
            del component.forward  # back to the class's forward


def patching_per_example(model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                         heads: Sequence[Head] | None = None, metric: Metric | None = None, batch_size: int = 8,
                         heads_per_forward: int = 8, cached_prefix: bool = True,
                         progress: bool = True) -> Float[torch.Tensor, "example n_layers n_heads"]:
    """``m(clean) − m(head h ← μ)`` of every example and head, ``[n, L, H]`` (NaN: not in ``heads``).
    ``cached_prefix``: the blocks below a group's heads return the clean forward's outputs and each
    batch of ``batch_size`` examples runs regrouped by length (module docstring); heads are grouped
    within a layer so each forward skips as much as it can. A forward holds at most ``batch_size``
    examples x ``heads_per_forward`` heads."""
    if not isinstance(heads_per_forward, int) or heads_per_forward < 1:
        raise CtsftError(f"heads_per_forward must be an integer >= 1, got {heads_per_forward!r}")
    mu_z, batch_list = prepare(model, examples, means, batch_size, progress)
    select = head_table(model, heads)
    listed = [(int(layer), int(head)) for layer, head in select.nonzero().tolist()]
    fn = metric or logit_diff
    n_layers, n_heads = select.shape
    device = model.cfg.device
    groups = ([[h for h in listed if h[0] == layer][i:i + heads_per_forward]
               for layer in range(n_layers) for i in range(0, int(select[layer].sum()), heads_per_forward)]
              if cached_prefix else
              [listed[i:i + heads_per_forward] for i in range(0, len(listed), heads_per_forward)])

    @torch.no_grad()
    def per_batch(batch: Batch) -> torch.Tensor:
        if not cached_prefix:
            return per_rows(batch)
        out = torch.empty(batch.input_ids.shape[0], n_layers, n_heads, dtype=torch.float64)
        for index, part in batch.length_buckets():  # forwards that carry at most 1/4 padding
            out[index] = per_rows(part)
        return out

    def per_rows(batch: Batch) -> torch.Tensor:
        b = batch.input_ids.shape[0]
        with _recorded_blocks(model) if cached_prefix else contextlib.nullcontext({}) as recorded:
            clean = fn_metric(batch)
        out = torch.zeros(b, n_layers, n_heads, dtype=torch.float64)
        for part in groups:
            rows = torch.zeros(len(part), n_layers, n_heads, dtype=torch.bool)
            for i, (layer, head) in enumerate(part):
                rows[i, layer, head] = True
            hooks = []
            for layer in sorted({layer for layer, _ in part}):
                patch = rows[:, layer].repeat_interleave(b, dim=0).to(device)[:, None, :, None]  # [k*B, 1, H, 1]

                def hook(z: torch.Tensor, hook: Any, patch: torch.Tensor = patch, layer: int = layer) -> torch.Tensor:
                    return torch.where(patch, mu_z[layer].to(z.dtype), z)

                hooks.append((hook_name(layer, "attn.hook_z"), hook))
            rep = Batch(batch.input_ids.repeat(len(part), 1), batch.attention_mask.repeat(len(part), 1),
                        batch.labels.repeat(len(part)), batch.label_token_ids)
            below = min(layer for layer, _ in part) if cached_prefix else 0
            with _cached_prefix(model, recorded, below, len(part)):
                patched = _metric(model, rep, fn, hooks).double().cpu().view(len(part), b)
            for i, (layer, head) in enumerate(part):
                out[:, layer, head] = clean - patched[i]
        return out

    def fn_metric(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return _metric(model, batch, fn).double().cpu()

    return score_tables(per_batch, batch_list, len(examples), select, "patching", progress)


def patching_scores(model: Any, examples: Sequence[Example], *, means: torch.Tensor | None = None,
                    heads: Sequence[Head] | None = None, batch_size: int = 8, heads_per_forward: int = 8,
                    cached_prefix: bool = True, progress: bool = True,
                    metric: Metric | None = None) -> Float[torch.Tensor, "n_layers n_heads"]:
    """Exact mean patching: the mean over examples of ``m(clean) − m(head h ← μ)`` for each head
    (NaN for heads not in ``heads``); ``heads_per_forward`` heads of one layer per forward, over
    examples of similar length (:func:`patching_per_example`). The yardstick the estimates (attribution, CD-T) are judged against."""
    return patching_per_example(model, examples, means=means, heads=heads, metric=metric, batch_size=batch_size,
                                heads_per_forward=heads_per_forward, cached_prefix=cached_prefix,
                                progress=progress).mean(0)
