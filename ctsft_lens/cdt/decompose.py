"""CD-T: split every activation downstream of chosen attention heads into β + γ.

β is the part of an activation that comes from the *source* (a head's output, minus its
baseline), γ is everything else. Both streams are pushed through the model layer by layer with
the rules of contextual decomposition (Hsu et al. 2024, after Murdoch et al. 2018), reading the
weights from the ``TransformerBridge`` and the totals the rules need (norm scales, the real
attention pattern, rotary tables) from one real ``run_with_cache`` forward:

* linear ``x W + b``: ``βW``, ``γW``, the bias shared in proportion to ``|βW| : |γW|``;
* LayerNorm: each stream centred, both divided by the *total*'s scale, times the weight; the
  bias shared by ``|β| : |γ|`` of the input (as ``prop_layer_norm`` of the public CD-T code);
  RMSNorm: both divided by the total's RMS, times the weight;
* element-wise activation ``f``: ``γ' = f(γ)``, ``β' = f(β + γ) - f(γ)``;
* product ``a ⊙ u`` (SwiGLU): every term holding a β goes to β, ``γ_a ⊙ γ_u`` to γ;
* rotary embeddings: applied to both streams (linear at each position);
* attention, rule ``"cdt"``: ``P_β = softmax(q_β k_βᵀ / √d)`` over the allowed (causal,
  non-padding) keys, ``P_γ = P - P_β`` with ``P`` the real pattern; ``z_β = P_β v_β`` and
  ``z_γ = P_γ v_β + P v_γ``, so ``z_β + z_γ = P (v_β + v_γ)`` is the real ``z``. Rule
  ``"frozen"``: the real pattern for both, ``z_β = P v_β``, ``z_γ = P v_γ``. The public CD-T
  code (``prop_attention_no_output_hh`` in adelaidehsu/CD_Circuit) uses the frozen rule.
  GQA: each query head reads its KV group.

The streams are propagated independently (γ is never ``total - β`` below the source), so
``β + γ == real activation`` at every hook is a real check of the rules (see the tests).
Where a bias share has ``|βW| + |γW| = 0`` the bias goes to γ, so the split is exact (the
public code adds ``1e-8`` instead). Its ``normalize_rel_irrel`` sign clean-up is not applied.

Many sources propagate at once: the leading tensor dimension is ``[source, example]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float

from ctsft_lens.batching import Batch
from ctsft_lens.forward import attn_results, hook_layer, run
from ctsft_lens.options import ATTENTION_RULES, AttentionRule, check


class Split(NamedTuple):
    """β (from the sources) and γ (the rest) of one activation; ``beta + gamma`` is the total."""

    beta: torch.Tensor
    gamma: torch.Tensor


@dataclass(frozen=True)
class Source:
    """A source node: attention head ``head`` of ``layer`` (its ``hook_result``).

    ``positions`` are token indices into each *unpadded* prompt (negative from its end, e.g.
    ``(-1,)`` for the last token); ``None`` means every real token.
    """

    layer: int
    head: int
    positions: tuple[int, ...] | None = None


Emit = Callable[[str, Split], None]


# --------------------------------------------------------------------------------------------
# Rules for one operation each
# --------------------------------------------------------------------------------------------
def share_bias(wb: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor | None, by: Split | None = None) -> Split:
    """Add ``bias`` to ``wb`` and ``wg`` in proportion to ``|wb| : |wg|`` (or to ``|by.beta| : |by.gamma|``).

    Where both weights are 0 the whole bias goes to γ, so the split stays exact.
    """
    if bias is None:
        return Split(wb, wg)
    ab, ag = (wb.abs(), wg.abs()) if by is None else (by.beta.abs(), by.gamma.abs())
    den = ab + ag
    frac = torch.where(den > 0, ab / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return Split(wb + bias * frac, wg + bias * (1 - frac))


def linear(x: Split, weight: Float[torch.Tensor, "d_in d_out"], bias: torch.Tensor | None) -> Split:
    """``x W + b`` on both streams."""
    return share_bias(x.beta @ weight, x.gamma @ weight, bias)


def linear_heads(x: Split, weight: Float[torch.Tensor, "head d_model d_head"],
                 bias: Float[torch.Tensor, "head d_head"] | None) -> Split:
    """Per-head projection (``W_Q``/``W_K``/``W_V``): ``[..., pos, d_model] -> [..., pos, head, d_head]``."""
    n_heads, d_model, d_head = weight.shape
    flat = weight.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    out = linear(x, flat, None if bias is None else bias.reshape(-1))
    return Split(*(t.unflatten(-1, (n_heads, d_head)) for t in out))


def norm(x: Split, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, rms: bool) -> Split:
    """LayerNorm / RMSNorm with the total's ``scale`` (``hook_scale`` of the real forward)."""
    b, g = x
    scale, weight = scale.to(b.dtype), weight.to(b.dtype)
    bias = None if bias is None else bias.to(b.dtype)
    if not rms:
        b, g = b - b.mean(-1, keepdim=True), g - g.mean(-1, keepdim=True)
    return share_bias(b / scale * weight, g / scale * weight, bias, by=x)


def activation(x: Split, f: Callable[[torch.Tensor], torch.Tensor]) -> Split:
    """``γ' = f(γ)``, ``β' = f(β + γ) - f(γ)``."""
    fg = f(x.gamma)
    return Split(f(x.beta + x.gamma) - fg, fg)


def product(a: Split, u: Split) -> Split:
    """``a ⊙ u``: β gets ``β_a β_u + β_a γ_u + γ_a β_u``, γ gets ``γ_a γ_u``."""
    return Split(a.beta * (u.beta + u.gamma) + a.gamma * u.beta, a.gamma * u.gamma)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/Qwen convention); ``cos``/``sin`` ``[batch, pos, d_head]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[..., None, :] + torch.cat([-x2, x1], dim=-1) * sin[..., None, :]


def attention(
    q: Split, k: Split, v: Split,
    pattern: Float[torch.Tensor, "batch head q k"],
    allowed: Bool[torch.Tensor, "batch 1 q k"],
    scale: float,
    rule: AttentionRule,
) -> Split:
    """``z`` of every head from split q/k/v ``[..., batch, pos, head, d_head]`` (KV already per query head)."""
    vb, vg = v.beta.transpose(-2, -3), v.gamma.transpose(-2, -3)  # [..., B, H, k, e]
    if rule == "frozen":
        zb, zg = pattern @ vb, pattern @ vg
    else:
        qb, kb = q.beta.transpose(-2, -3), k.beta.transpose(-2, -3)
        scores = (qb @ kb.transpose(-1, -2)).div_(scale).masked_fill_(~allowed, float("-inf"))
        p_beta = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no allowed key: 0
        del scores
        zb = p_beta @ vb
        # (P - P_β) v_β + P v_γ, with one matmul fewer: P (v_β + v_γ) - P_β v_β
        zg = (pattern @ (vb + vg)).sub_(zb)
    return Split(zb.transpose(-2, -3), zg.transpose(-2, -3))


# --------------------------------------------------------------------------------------------
# The model, layer by layer
# --------------------------------------------------------------------------------------------
def _norm_module(model: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    mod = model.ln_final if name == "ln_final" else getattr(model.blocks[hook_layer(name)], name.split(".")[2])
    rms = bool(getattr(mod, "uses_rms_norm", False)) or model.cfg.normalization_type == "RMS"
    return mod.w, (None if rms else mod.b), rms


def _act_fn(model: Any, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    orig = model.blocks[layer].mlp.original_component
    fn = getattr(orig, "act", None) or getattr(orig, "act_fn", None)
    if fn is None:
        raise NotImplementedError(f"cannot find the MLP activation of layer {layer}")
    return fn


def is_rotary(model: Any) -> bool:
    """Whether the model rotates queries and keys (RoPE) rather than adding learned positions."""
    return model.cfg.positional_embedding_type == "rotary"


def cache_names(model: Any, source_layers: Sequence[int]) -> list[str]:
    """Hooks of the real forward that the propagation from sources in ``source_layers`` reads."""
    names = ["ln_final.hook_scale"]
    for layer in sorted(set(source_layers)):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_result"]
    for layer in range(min(source_layers), model.cfg.n_layers):
        names += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale",
                  f"blocks.{layer}.attn.hook_pattern"]
        if is_rotary(model):
            names += [f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin"]
    return names


def allowed_keys(attention_mask: torch.Tensor) -> Bool[torch.Tensor, "batch 1 q k"]:
    """Causal and non-padding keys for every query: what a β pattern may attend to."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


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
                    raise ValueError(f"source position {p} is outside a prompt of {n} tokens")
                out[i, b, width - n + p if p >= 0 else width + p] = True
    return out


def source_split(
    model: Any, cache: Any, sources: Sequence[Source], attention_mask: torch.Tensor,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None,
) -> Split:
    """β/γ of ``hook_attn_out`` at the sources' layer: β = a(s) - μ at the chosen positions."""
    layer = sources[0].layer
    result = cache[f"blocks.{layer}.attn.hook_result"]  # [B, pos, H, d]
    heads = torch.tensor([s.head for s in sources], device=result.device)
    own = result[:, :, heads].permute(2, 0, 1, 3)  # [S, B, pos, d]
    if means is not None:
        own = own - means[layer, heads].to(own)[:, None, None, :]
    where = source_positions(sources, attention_mask)[..., None]
    beta = torch.where(where, own, torch.zeros_like(own))
    b_o = model.blocks[layer].attn.b_O
    total = result.sum(2) + (0 if b_o is None else b_o)
    return Split(beta, total[None] - beta)


@torch.no_grad()
def propagate(
    model: Any, cache: Any, attention_mask: torch.Tensor, sources: Sequence[Source], *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    attention_rule: AttentionRule = "cdt",
    emit: Emit,
    stop_layer: int | None = None,
    last_only: bool = False,
) -> None:
    """Push β/γ of ``sources`` (all in one layer) upward; call ``emit(hook_name, Split)`` on the way.

    Tensors are ``[source, batch, pos, ...]``. ``stop_layer``: stop after that layer's
    ``attn.hook_z`` (for head targets); ``None``: go on to ``ln_final.hook_out``.
    ``last_only``: in the last layer computed, only the last token's queries and MLP (all a
    last-token target needs); what is emitted there has one position.
    """
    check("attention rule", attention_rule, ATTENTION_RULES)
    layers = {s.layer for s in sources}
    if len(layers) != 1:
        raise ValueError(f"propagate takes sources of one layer, got layers {sorted(layers)}")
    cfg = model.cfg
    first = layers.pop()
    last = cfg.n_layers - 1 if stop_layer is None else stop_layer
    allowed = allowed_keys(attention_mask)
    scale = cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(cfg.d_head)
    group = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)

    attn_out = source_split(model, cache, sources, attention_mask, means)
    emit(f"blocks.{first}.hook_attn_out", attn_out)
    resid = Split(attn_out.beta, cache[f"blocks.{first}.hook_resid_pre"][None] + attn_out.gamma)
    keep = slice(None)  # the positions computed from here on
    for layer in range(first, last + 1):
        blk, pre = model.blocks[layer], f"blocks.{layer}"
        if last_only and layer == last:
            keep = slice(-1, None)
        if layer > first:
            emit(f"{pre}.hook_resid_pre", resid)
            w, b, rms = _norm_module(model, f"{pre}.ln1")
            x = norm(resid, cache[f"{pre}.ln1.hook_scale"], w, b, rms=rms)
            emit(f"{pre}.ln1.hook_out", x)
            a = blk.attn
            q = linear_heads(Split(x.beta[..., keep, :], x.gamma[..., keep, :]), a.W_Q, a.b_Q)
            k = linear_heads(x, a.W_K, a.b_K)
            v = linear_heads(x, a.W_V, a.b_V)
            emit(f"{pre}.attn.hook_q", q)
            emit(f"{pre}.attn.hook_k", k)
            emit(f"{pre}.attn.hook_v", v)
            if is_rotary(model):
                cos, sin = cache[f"{pre}.attn.hook_cos"], cache[f"{pre}.attn.hook_sin"]
                if cos.shape[-1] != cfg.d_head:
                    raise NotImplementedError("partial rotary embeddings are not supported")
                q = Split(*(rotary(t, cos[:, keep], sin[:, keep]) for t in q))
                k = Split(*(rotary(t, cos, sin) for t in k))
                emit(f"{pre}.attn.hook_rot_q", q)
                emit(f"{pre}.attn.hook_rot_k", k)
            if group > 1:
                k = Split(*(t.repeat_interleave(group, dim=-2) for t in k))
                v = Split(*(t.repeat_interleave(group, dim=-2) for t in v))
            z = attention(q, k, v, cache[f"{pre}.attn.hook_pattern"][:, :, keep], allowed[:, :, keep],
                          scale, attention_rule)
            emit(f"{pre}.attn.hook_z", z)
            if layer == stop_layer:
                return
            w_o = a.W_O.reshape(-1, a.W_O.shape[-1])
            attn_out = linear(Split(z.beta.flatten(-2), z.gamma.flatten(-2)), w_o, a.b_O)
            emit(f"{pre}.hook_attn_out", attn_out)
            resid = Split(resid.beta[..., keep, :] + attn_out.beta, resid.gamma[..., keep, :] + attn_out.gamma)
        else:
            resid = Split(resid.beta[..., keep, :], resid.gamma[..., keep, :])
        emit(f"{pre}.hook_resid_mid", resid)
        w, b, rms = _norm_module(model, f"{pre}.ln2")
        x = norm(resid, cache[f"{pre}.ln2.hook_scale"][:, keep], w, b, rms=rms)
        emit(f"{pre}.ln2.hook_out", x)
        mlp, f = blk.mlp, _act_fn(model, layer)
        if cfg.gated_mlp:
            gate = linear(x, mlp.W_gate, getattr(mlp, "b_gate", None))
            up = linear(x, mlp.W_in, mlp.b_in)
            emit(f"{pre}.mlp.hook_pre", gate)
            emit(f"{pre}.mlp.hook_pre_linear", up)
            post = product(activation(gate, f), up)
        else:
            pre_act = linear(x, mlp.W_in, mlp.b_in)
            emit(f"{pre}.mlp.hook_pre", pre_act)
            post = activation(pre_act, f)
        emit(f"{pre}.mlp.hook_post", post)
        mlp_out = linear(post, mlp.W_out, mlp.b_out)
        emit(f"{pre}.hook_mlp_out", mlp_out)
        resid = Split(resid.beta + mlp_out.beta, resid.gamma + mlp_out.gamma)
        emit(f"{pre}.hook_resid_post", resid)
    w, b, rms = _norm_module(model, "ln_final")
    emit("ln_final.hook_out", norm(resid, cache["ln_final.hook_scale"][:, keep], w, b, rms=rms))


def head_output(model: Any, layer: int, head: int, z: Split) -> Split:
    """β/γ of ``blocks.layer.attn.hook_result`` for one head, from the split ``hook_z``."""
    w_o = model.blocks[layer].attn.W_O[head]
    return Split(z.beta[..., head, :] @ w_o, z.gamma[..., head, :] @ w_o)


def unembed(model: Any, x: Split) -> Split:
    """Logits from the split final normalised residual (``b_U`` shared like any bias)."""
    return linear(x, model.W_U, model.b_U)


# --------------------------------------------------------------------------------------------
# One call for notebooks and tests
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def decompose(
    model: Any, batch: Batch, sources: Sequence[Source], record: Sequence[str], *,
    means: Float[torch.Tensor, "n_layers n_heads d_model"] | None = None,
    attention_rule: AttentionRule = "cdt",
) -> dict[str, Split]:
    """β/γ of each ``sources[i]`` at every hook in ``record``, as ``[source, batch, ...]`` tensors.

    ``means=None`` is the zero baseline. Record names are TransformerLens hook names
    (``blocks.2.hook_resid_post``, ``blocks.1.attn.hook_result``, ``ln_final.hook_out``,
    ``unembed.hook_out``...). At a hook upstream of a source, β is 0 and γ the total.
    """
    if not sources:
        raise ValueError("no sources given")
    names = cache_names(model, [s.layer for s in sources]) + [n for n in record if n != "unembed.hook_out"]
    with attn_results(model):
        logits, cache = run(model, batch, names=names)
    mask = batch.attention_mask.to(logits.device)
    results: dict[str, list[torch.Tensor]] = {name: [] for name in record}
    order: list[int] = []
    for layer in sorted({s.layer for s in sources}):
        idx = [i for i, s in enumerate(sources) if s.layer == layer]
        group = [sources[i] for i in idx]
        order += idx
        seen: dict[str, Split] = {}
        propagate(model, cache, mask, group, means=means, attention_rule=attention_rule,
                  emit=lambda name, x: seen.__setitem__(name, x))
        for name in record:
            results[name].append(torch.stack(_recorded(model, cache, logits, seen, group, mask, means, name)))
    inverse = torch.tensor(order).argsort()
    return {name: Split(*torch.cat(parts, dim=1)[:, inverse]) for name, parts in results.items()}


def _recorded(model: Any, cache: Any, logits: torch.Tensor, seen: dict[str, Split], group: Sequence[Source],
              mask: torch.Tensor, means: torch.Tensor | None, name: str) -> Split:
    """The split at hook ``name`` for one layer group, from what ``propagate`` emitted."""
    if name == "unembed.hook_out":
        return unembed(model, seen["ln_final.hook_out"])
    if name in seen:
        return seen[name]
    total = cache[name]
    if name.endswith(".attn.hook_result"):
        layer = hook_layer(name)
        z = seen.get(name.replace("hook_result", "hook_z"))
        if z is not None:
            parts = [head_output(model, layer, h, z) for h in range(model.cfg.n_heads)]
            return Split(torch.stack([p.beta for p in parts], -2), torch.stack([p.gamma for p in parts], -2))
        if layer == group[0].layer:  # the sources' own layer: β sits in the source head only
            own = source_split(model, cache, group, mask, means).beta  # [S, B, pos, d]
            heads = torch.tensor([s.head for s in group])
            beta = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
            beta[torch.arange(len(group)), :, :, heads] = own
            return Split(beta, total[None] - beta)
    zero = torch.zeros(len(group), *total.shape, dtype=total.dtype, device=total.device)
    return Split(zero, total[None].expand_as(zero).clone())
