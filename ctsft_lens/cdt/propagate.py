"""CD-T through the model, layer by layer: from the sources' split attention output to the final
norm (or a target layer's ``hook_z``), calling each operation's rule (``cdt.rules.Rules``, one
file per operation) and checking every split it can against the real forward (``cdt.health``).

β is the part of an activation that comes from the *source* heads (their output minus the
baseline), γ everything else. The weights come from the ``TransformerBridge``; the totals the
rules need (norm scales, the real attention pattern, rotary tables) from one real
``run_with_cache`` forward (:func:`cache_names`). Rotary embeddings apply to both streams; GQA
query heads read their KV group; the embedding scale is upstream of every source: no rule.
Which family has which operation is ``ctsft_lens.models.architectures``; an operation or config
feature without a rule raises :class:`~ctsft_lens.errors.UnsupportedOperationError`.

Two ways to push the streams (``streams``, issue #12):

* ``"both"`` (the reference): β and γ are propagated independently (γ is never ``total - β``
  below the source), so ``β + γ == real activation`` at every hook is a real check of the rules;
* ``"beta"`` (default, about half the matmuls): only β goes through the weights; at every linear
  map ``γW = (real output - b) - βW`` with the real output read from the same forward, and in
  attention ``z_γ = z - z_β``. The element-wise rules still see both streams, so the two paths are
  the same equations and agree to float rounding (tested ≤ 1e-5). β is zero before the first
  source position, so under a rule of ``attention.FROM_FIRST_SOURCE`` this path starts there: the
  keys it drops carry ``k_β = 0``, whose share of the β-softmax is kept as one pseudo-key of score
  ``log(n)`` (``n`` per query: under a sliding window later queries drop fewer keys). Under any
  other attention rule it starts at position 0.

Many sources propagate at once: the leading tensor dimension is ``[source, example]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float

from ctsft_lens.cdt import activation, normalize, product
from ctsft_lens.cdt.attention import (FROM_FIRST_SOURCE, allowed_keys, attention, check_keys, check_rotary, is_rotary,
                                      rotary)
from ctsft_lens.cdt.bias import add_bias, linear, linear_heads
from ctsft_lens.cdt.health import Health, health_at
from ctsft_lens.cdt.norm import model_norm, post_norm, pre_norm, qk_norm
from ctsft_lens.cdt.rules import Rules, refuse_folded
from ctsft_lens.cdt.split import Emit, Source, Split
from ctsft_lens.errors import CtsftError
from ctsft_lens.models.architectures import architecture, attention_scale, sliding_windows, soft_caps
from ctsft_lens.options import STREAMS, Streams
from ctsft_lens.options import check as check_option


@torch.no_grad()
def propagate(
    model: Any, cache: Any, attention_mask: torch.Tensor, sources: Sequence[Source], *,
    rules: Rules,
    emit: Emit,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    stop_layer: int | None = None,
    last_only: bool = False,
    streams: Streams = "beta",
    **folded: Any,
) -> Health:
    """Push β/γ of ``sources`` (all in one layer) upward under ``rules``; call ``emit(hook_name, Split)``
    on the way.

    Tensors are ``[source, batch, pos, ...]``. ``stop_layer``: stop after that layer's
    ``attn.hook_z`` (for head targets); ``None``: go on to ``ln_final.hook_out``.
    ``last_only``: in the last layer computed, only the last token's queries and MLP (all a
    last-token target needs); what is emitted there has one position. ``streams="beta"``: the
    fast path (module docstring); it needs a cache with ``cache_names(..., "beta")`` and emits
    positions from :func:`start_position` on only. Returns the :class:`~ctsft_lens.cdt.health.Health`
    of each source, checked against every real activation the cache holds among
    ``hook_resid_post``, the final ``attn.hook_z`` and ``ln_final.hook_out``.
    """
    refuse_folded(folded, rules)
    check_option("streams", streams, STREAMS)
    layers = {s.layer for s in sources}
    if len(layers) != 1:
        raise ValueError(f"propagate takes sources of one layer, got layers {sorted(layers)}")
    cfg = model.cfg
    first = layers.pop()
    last = cfg.n_layers - 1 if stop_layer is None else stop_layer
    windows = sliding_windows(model)
    fast = streams == "beta"
    p0 = start_position(sources, attention_mask, streams, rules)  # β is 0 before p0
    full = {w: allowed_keys(attention_mask, w) for w in set(windows)}  # per layer window (None: none)
    allowed = {w: a[..., p0:, p0:] for w, a in full.items()}
    # allowed keys dropped before p0, per query (a window drops fewer, then none, for later queries)
    prefix = {w: a[:, 0, p0:, :p0].sum(-1) for w, a in full.items()} if p0 else None
    real_queries = attention_mask.bool()[:, p0:]

    def real(name: str, keep: slice = slice(None)) -> torch.Tensor | None:
        """The real activation at ``name`` over the positions computed (β-only path), else None."""
        return cache[name][:, p0:][:, keep] if fast else None
    scale = attention_scale(model)
    attn_cap = soft_caps(model)[0]
    group = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    tidy = normalize.RULES[rules.normalize]
    combine = product.RULES[rules.product]
    act = activation.RULES[rules.activation]
    bias_rule = rules.bias
    health = Health.good(len(sources))

    def check(name: str, x: Split, keep: slice) -> None:
        nonlocal health
        total = _cached(cache, name)
        if total is not None:
            health = health.merge(health_at(x, total[:, p0:][:, keep]))

    attn_out = source_split(model, cache, sources, attention_mask, means, rules)
    dt = rules.dtype(attn_out.beta.dtype)
    attn_out = Split(attn_out.beta[..., p0:, :].to(dt), attn_out.gamma[..., p0:, :].to(dt))
    attn_out = post_norm(model, cache, f"blocks.{first}.ln1_post", attn_out, slice(None), emit, p0, rules)
    emit(f"blocks.{first}.hook_attn_out", attn_out)
    resid = Split(attn_out.beta, cache[f"blocks.{first}.hook_resid_pre"][None, :, p0:].to(dt) + attn_out.gamma)
    keep = slice(None)  # the positions computed from here on
    for layer in range(first, last + 1):
        blk, pre = model.blocks[layer], f"blocks.{layer}"
        if last_only and layer == last:
            keep = slice(-1, None)
        if layer > first:
            emit(f"{pre}.hook_resid_pre", resid)
            x = pre_norm(model, cache, f"{pre}.ln1", resid, slice(None), emit, p0, rules)
            a = blk.attn
            q = linear_heads(Split(x.beta[..., keep, :], x.gamma[..., keep, :]), a.W_Q, a.b_Q,
                             real(f"{pre}.attn.hook_q", keep), bias_rule)
            k = linear_heads(x, a.W_K, a.b_K, real(f"{pre}.attn.hook_k"), bias_rule)
            v = linear_heads(x, a.W_V, a.b_V, real(f"{pre}.attn.hook_v"), bias_rule)
            emit(f"{pre}.attn.hook_q", q)
            emit(f"{pre}.attn.hook_k", k)
            emit(f"{pre}.attn.hook_v", v)
            q, k = qk_norm(model, cache, pre, q, k, keep, emit, p0, rules)
            if is_rotary(model):
                cos, sin = cache[f"{pre}.attn.hook_cos"][:, p0:], cache[f"{pre}.attn.hook_sin"][:, p0:]
                check_rotary(model, cos)
                q = Split(*(rotary(t, cos[:, keep], sin[:, keep]) for t in q))
                k = Split(*(rotary(t, cos, sin) for t in k))
                emit(f"{pre}.attn.hook_rot_q", q)
                emit(f"{pre}.attn.hook_rot_k", k)
            if group > 1:
                k = Split(*(t.repeat_interleave(group, dim=-2) for t in k))
                v = Split(*(t.repeat_interleave(group, dim=-2) for t in v))
            pattern = cache[f"{pre}.attn.hook_pattern"][..., p0:, p0:][:, :, keep]
            keys = allowed[windows[layer]][:, :, keep]
            check_keys(pattern, keys, real_queries[:, keep], layer)
            z = attention(q, k, v, pattern, keys, scale, rules.attention, z=real(f"{pre}.attn.hook_z", keep),
                          prefix=None if prefix is None else prefix[windows[layer]][:, keep], softcap=attn_cap)
            emit(f"{pre}.attn.hook_z", z)
            if layer == stop_layer:
                check(f"{pre}.attn.hook_z", z, keep)
                return health
            w_o = a.W_O.reshape(-1, a.W_O.shape[-1])
            attn_out = tidy("attn_out", linear(Split(z.beta.flatten(-2), z.gamma.flatten(-2)), w_o, a.b_O,
                                               real(f"{pre}.attn.hook_out", keep), bias_rule))
            attn_out = post_norm(model, cache, f"{pre}.ln1_post", attn_out, keep, emit, p0, rules)
            emit(f"{pre}.hook_attn_out", attn_out)
            resid = tidy("resid_mid", Split(resid.beta[..., keep, :] + attn_out.beta,
                                            resid.gamma[..., keep, :] + attn_out.gamma))
        else:
            resid = Split(resid.beta[..., keep, :], resid.gamma[..., keep, :])
        emit(f"{pre}.hook_resid_mid", resid)
        x = pre_norm(model, cache, f"{pre}.ln2", resid, keep, emit, p0, rules)
        mlp, f = blk.mlp, activation.act_fn(model, layer)
        pre_total = real(f"{pre}.mlp.hook_pre", keep)
        f_total = None if pre_total is None else f(pre_total.to(dt))  # once for every source
        if architecture(model).gated:
            gate = tidy("mlp_in", linear(x, mlp.W_gate, getattr(mlp, "b_gate", None), pre_total, bias_rule))
            up = tidy("mlp_in", linear(x, mlp.W_in, mlp.b_in, real(f"{pre}.mlp.hook_pre_linear", keep), bias_rule))
            emit(f"{pre}.mlp.hook_pre", gate)
            emit(f"{pre}.mlp.hook_pre_linear", up)
            post = combine(act(gate, f, f_total), up)
        else:
            pre_act = tidy("mlp_in", linear(x, mlp.W_in, mlp.b_in, pre_total, bias_rule))
            emit(f"{pre}.mlp.hook_pre", pre_act)
            post = act(pre_act, f, f_total)
        emit(f"{pre}.mlp.hook_post", post)
        mlp_out = tidy("mlp_out", linear(post, mlp.W_out, mlp.b_out, real(f"{pre}.mlp.hook_out", keep), bias_rule))
        mlp_out = post_norm(model, cache, f"{pre}.ln2_post", mlp_out, keep, emit, p0, rules)
        emit(f"{pre}.hook_mlp_out", mlp_out)
        resid = tidy("resid_post", Split(resid.beta + mlp_out.beta, resid.gamma + mlp_out.gamma))
        emit(f"{pre}.hook_resid_post", resid)
        check(f"{pre}.hook_resid_post", resid, keep)
    out = model_norm(model, cache, "ln_final", resid, keep, p0, rules)
    emit("ln_final.hook_out", out)
    check("ln_final.hook_out", out, keep)
    return health


def _cached(cache: Any, name: str) -> torch.Tensor | None:
    """``cache[name]``, or None when the forward did not keep that hook."""
    try:
        return cache[name]
    except KeyError:
        return None


# --------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------
def source_positions(sources: Sequence[Source], attention_mask: torch.Tensor) -> Bool[torch.Tensor, "source batch pos"]:
    """Which token positions of each padded example carry each source's β."""
    real = attention_mask.bool()
    width = real.shape[1]
    lengths = real.sum(1)
    out = torch.zeros(len(sources), *real.shape, dtype=torch.bool, device=real.device)
    for i, src in enumerate(sources):
        if src.positions is None:
            out[i] = real
            continue
        for b, n in enumerate(lengths.tolist()):
            for p in src.positions:
                if not -n <= p < n:
                    raise CtsftError(f"source position {p} is outside a prompt of {n} tokens: give positions "
                                     f"within the shortest prompt (e.g. -1, the last token)")
                out[i, b, width - n + p if p >= 0 else width + p] = True
    return out


def first_position(sources: Sequence[Source], attention_mask: torch.Tensor) -> int:
    """The first padded position where some source of some example has β (β is 0 before it)."""
    where = source_positions(sources, attention_mask).flatten(0, 1).any(0)
    return int(where.nonzero().min()) if bool(where.any()) else attention_mask.shape[1]


def start_position(sources: Sequence[Source], attention_mask: torch.Tensor, streams: Streams, rules: Rules) -> int:
    """Where propagation starts: :func:`first_position` on the β-only path under an attention rule
    of ``attention.FROM_FIRST_SOURCE``, else 0 (as with both streams)."""
    if streams != "beta" or rules.attention not in FROM_FIRST_SOURCE:
        return 0
    return first_position(sources, attention_mask)


def source_beta(cache: Any, sources: Sequence[Source], attention_mask: torch.Tensor,
                means: Float[torch.Tensor, "n_layers n_heads d_model"] | None) -> Float[torch.Tensor, "source batch pos d_model"]:
    """β of each source head's own output (``hook_result``): a(s) − μ at its positions, 0 elsewhere."""
    layer = sources[0].layer
    result = cache[f"blocks.{layer}.attn.hook_result"]  # [B, pos, H, d]
    heads = torch.tensor([s.head for s in sources], device=result.device)
    own = result[:, :, heads].permute(2, 0, 1, 3)  # [S, B, pos, d]
    if means is not None:
        own = own - means[layer, heads].to(own)[:, None, None, :]
    where = source_positions(sources, attention_mask)[..., None]
    return torch.where(where, own, torch.zeros_like(own))


def source_split(model: Any, cache: Any, sources: Sequence[Source], attention_mask: torch.Tensor,
                 means: Float[torch.Tensor, "n_layers n_heads d_model"] | None, rules: Rules) -> Split:
    """β/γ of the attention output (``attn.hook_out``, before any post-norm) at the sources' layer:
    β = a(s) − μ at the chosen positions, b_O by the ``bias_o`` rule (unset: the ``bias`` rule).
    Qwen2 has no b_O: every rule agrees there."""
    beta = source_beta(cache, sources, attention_mask, means)
    layer = sources[0].layer
    rest = cache[f"blocks.{layer}.attn.hook_result"].sum(2)[None] - beta
    return add_bias(beta, rest, model.blocks[layer].attn.b_O, rules.bias_o or rules.bias)


def cache_names(model: Any, source_layers: Sequence[int], streams: Streams = "beta") -> list[str]:
    """Hooks of the real forward that the propagation from sources in ``source_layers`` reads.

    Also the hooks it is checked against (:class:`~ctsft_lens.cdt.health.Health`): every
    ``hook_resid_post`` and ``attn.hook_z`` above the lowest source layer and ``ln_final.hook_out``.
    The β-only path (``streams="beta"``) also reads the real output of every linear map it crosses.
    """
    names = ["ln_final.hook_scale", "ln_final.hook_out"]
    for layer in sorted(set(source_layers)):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_result"]
    row = architecture(model)
    norms = (["ln1", "ln2"] if row.pre_norms else []) + (["ln1_post", "ln2_post"] if row.post_norms else [])
    norms += ["attn.q_norm", "attn.k_norm"] if row.qk_norm else []
    for layer in range(min(source_layers), model.cfg.n_layers):
        names += [f"blocks.{layer}.{n}.hook_scale" for n in norms]
        names += [f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.hook_resid_post",
                  f"blocks.{layer}.attn.hook_z"]
        if is_rotary(model):
            names += [f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"]
        if streams == "beta":
            names += [f"blocks.{layer}.{h}" for h in _LINEAR_OUTPUTS]
            if not row.gated:
                names.remove(f"blocks.{layer}.mlp.hook_pre_linear")
    return names


_LINEAR_OUTPUTS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_out", "mlp.hook_pre",
                   "mlp.hook_pre_linear", "mlp.hook_out")
"""Real outputs of the linear maps, read by the β-only path (``γW = out - b - βW``); the
sublayers' raw outputs (``attn.hook_out`` = ``hook_attn_out`` unless a post-norm follows)."""


# --------------------------------------------------------------------------------------------
# Read-outs of what propagation emitted
# --------------------------------------------------------------------------------------------
def head_output(model: Any, layer: int, head: int, z: Split) -> Split:
    """β/γ of ``blocks.layer.attn.hook_result`` for one head, from the split ``hook_z``."""
    w_o = model.blocks[layer].attn.W_O[head].to(z.beta.dtype)
    return Split(z.beta[..., head, :] @ w_o, z.gamma[..., head, :] @ w_o)


def unembed(model: Any, x: Split, rules: Rules) -> Split:
    """Logits from the split final normalised residual (``b_U`` by the bias rule), soft-capped where
    the family caps them (by the activation rule): the model's output logits."""
    return activation.logit_cap(model, linear(x, model.W_U, model.b_U, bias_rule=rules.bias), rule=rules.activation)


def label_logits(model: Any, x: Split, label_token_ids: torch.Tensor, rules: Rules) -> Split:
    """β/γ of the label logits (capped where the family caps them) from β/γ at the final norm ``[..., d]``:
    :func:`unembed`'s label columns, the others not computed."""
    ids = label_token_ids.to(model.W_U.device)
    b_u = getattr(model, "b_U", None)
    return activation.logit_cap(model, linear(x, model.W_U[:, ids], None if b_u is None else b_u[ids],
                                              bias_rule=rules.bias), rule=rules.activation)
