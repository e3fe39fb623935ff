"""CD-T rules for attention (the ``attention`` field of ``cdt.rules.Rules``), and what every rule reads
of the real forward: which keys a query may see, rotary embeddings, the real pattern and z.

Every rule takes split q/k/v ``[..., batch, pos, head, d_head]`` (K/V already per query head), the
real ``pattern`` and the ``allowed`` keys, and gives the split ``z``. ``z``: the real ``z`` (the
β-only path), then ``z_γ = z − z_β``; ``prefix``: for each query, the number of allowed keys left
out before the first key given, whose ``k_β`` is 0 (a rule in :data:`FROM_FIRST_SOURCE` may be given
one); ``softcap`` (Gemma 2): scores a rule computes are capped as the real ones, ``c·tanh(s/c)``,
before the mask and softmax.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from jaxtyping import Bool, Float

from ctsft_lens.cdt.split import Split
from ctsft_lens.errors import UnsupportedOperationError
from ctsft_lens.models.architectures import architecture


def _gamma(zb: torch.Tensor, v: Split, pattern: torch.Tensor, z: torch.Tensor | None) -> Split:
    """The split of ``z`` from ``z_β`` (``[..., B, H, q, e]``): γ = real − β, with the real z given or
    recomputed as ``P (v_β + v_γ)`` (cdt: ``(P − P_β) v_β + P v_γ``; frozen: ``P v_γ`` on the real queries)."""
    if z is not None:
        zb = zb.transpose(-2, -3)
        return Split(zb, z.to(zb.dtype) - zb)
    zg = (pattern @ (v.beta + v.gamma).transpose(-2, -3)).sub_(zb)
    return Split(zb.transpose(-2, -3), zg.transpose(-2, -3))


def cdt(q: Split, k: Split, v: Split, pattern: torch.Tensor, allowed: torch.Tensor, scale: float, *,
        z: torch.Tensor | None = None, prefix: torch.Tensor | None = None, softcap: float | None = None) -> Split:
    """``softmax(q_β k_βᵀ/√d) v_β`` over the allowed keys (the public CD-T code's
    ``prop_attention_no_output_hh``). The keys left out before the first one given (``prefix``)
    enter the β-softmax as one pseudo-key of score ``log(prefix)`` and value 0."""
    qb, kb = q.beta.transpose(-2, -3), k.beta.transpose(-2, -3)
    scores = (qb @ kb.transpose(-1, -2)).div_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.masked_fill_(~allowed, float("-inf"))
    if prefix is not None:
        pseudo = prefix.to(scores.dtype).log()[:, None, :, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, pseudo], dim=-1)
    p_beta = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no allowed key: 0
    del scores
    if prefix is not None:
        p_beta = p_beta[..., :-1]
    return _gamma(p_beta @ v.beta.transpose(-2, -3), v, pattern, z)


def frozen(q: Split, k: Split, v: Split, pattern: torch.Tensor, allowed: torch.Tensor, scale: float, *,
           z: torch.Tensor | None = None, prefix: torch.Tensor | None = None, softcap: float | None = None) -> Split:
    """``P v_β`` with the real (capped) pattern P, read at the allowed keys only (a padding query's
    real row is arbitrary)."""
    return _gamma(pattern.masked_fill(~allowed, 0.0) @ v.beta.transpose(-2, -3), v, pattern, z)


def linear(q: Split, k: Split, v: Split, pattern: torch.Tensor, allowed: torch.Tensor, scale: float, *,
           z: torch.Tensor | None = None, prefix: torch.Tensor | None = None, softcap: float | None = None) -> Split:
    """The pattern's first-order response: ``z_β = P v_β + δP v`` with ``δS = (q_β kᵀ + q k_βᵀ)/√d``
    (times the cap's slope ``1 − tanh²`` where capped) and ``δP = P ⊙ (δS − Σ_k P δS)``, real q, k, P.
    It reads every key (its δP reaches keys with ``k_β = 0``)."""
    if prefix is not None:
        raise ValueError("the linear attention rule needs every key: propagate from position 0 (no prefix)")
    pattern_b = pattern.masked_fill(~allowed, 0.0)
    qb, kb = q.beta.transpose(-2, -3), k.beta.transpose(-2, -3)
    qt, kt = (q.beta + q.gamma).transpose(-2, -3), (k.beta + k.gamma).transpose(-2, -3)
    d_scores = (qb @ kt.transpose(-1, -2)).add_(qt @ kb.transpose(-1, -2)).div_(scale)
    if softcap is not None:
        capped = (qt @ kt.transpose(-1, -2)).div_(scale * softcap).tanh_()
        d_scores.mul_(1 - capped.square_())
        del capped
    d_scores = d_scores.masked_fill_(~allowed, 0.0)
    d_pattern = pattern_b * (d_scores - (pattern_b * d_scores).sum(-1, keepdim=True))
    del d_scores, qt, kt
    zb = pattern_b @ v.beta.transpose(-2, -3) + d_pattern @ (v.beta + v.gamma).transpose(-2, -3)
    del d_pattern
    return _gamma(zb, v, pattern, z)


def difference(q: Split, k: Split, v: Split, pattern: torch.Tensor, allowed: torch.Tensor, scale: float, *,
               z: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
               softcap: float | None = None) -> Split:
    """The exact removal: ``z_γ = softmax(q_γ k_γᵀ/√d) v_γ`` (γ's own pattern, capped and masked as
    the real one), ``z_β = z − z_γ``; a query that no β reaches (its q_β and every allowed key's k_β,
    v_β zero, or no allowed key) keeps β = 0 exactly. With the ``difference`` rule everywhere, γ is
    the forward with the sources mean-ablated. It reads every key."""
    if prefix is not None:
        raise ValueError("the difference attention rule needs every key: propagate from position 0 (no prefix)")
    vb = v.beta.transpose(-2, -3)  # [..., B, H, k, e]
    qg, kg, vg = q.gamma.transpose(-2, -3), k.gamma.transpose(-2, -3), v.gamma.transpose(-2, -3)
    scores = (qg @ kg.transpose(-1, -2)).div_(scale)
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.masked_fill_(~allowed, float("-inf"))
    zg = torch.softmax(scores, dim=-1).nan_to_num_(0.0) @ vg  # rows with no allowed key: 0
    del scores
    total = z.to(vb.dtype).transpose(-2, -3) if z is not None else pattern @ (vb + vg)
    # β is exactly 0 at a query whose q_β and allowed k_β, v_β are all 0 (causality, not rounding)
    moved = (k.beta.transpose(-2, -3).abs().amax(-1) > 0) | (vb.abs().amax(-1) > 0)  # [..., B, H, k]
    touched = (allowed & moved[..., None, :]).any(-1) | (q.beta.transpose(-2, -3).abs().amax(-1) > 0)
    touched &= allowed.any(-1)  # a query with no allowed key reads nothing: β stays 0
    zb = torch.where(touched[..., None], total - zg, 0.0)
    zg = total - zb
    return Split(zb.transpose(-2, -3), zg.transpose(-2, -3))


RULES: dict[str, Callable[..., Split]] = {"cdt": cdt, "frozen": frozen, "linear": linear, "difference": difference}
"""Attention rules by name (``Rules.attention``)."""

FROM_FIRST_SOURCE = frozenset({"cdt", "frozen"})
"""Rules that read no key where β is 0 before the first source position, so the β-only path may
start there (given a ``prefix``); any other rule is propagated from position 0."""


def attention(
    q: Split, k: Split, v: Split,
    pattern: Float[torch.Tensor, "batch head q k"],
    allowed: Bool[torch.Tensor, "batch 1 q k"],
    scale: float,
    rule: str,
    z: Float[torch.Tensor, "batch q head d_head"] | None = None,
    prefix: Float[torch.Tensor, "batch q"] | None = None,
    softcap: float | None = None,
) -> Split:
    """``z`` of every head from split q/k/v by ``rule`` (:data:`RULES`; the module docstring says
    what ``z``, ``prefix`` and ``softcap`` are)."""
    return RULES[rule](q, k, v, pattern.to(v.beta.dtype), allowed, scale, z=z, prefix=prefix, softcap=softcap)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama/Qwen convention); ``cos``/``sin`` ``[batch, pos, rotary_dim]``.

    Partial rotary (Phi-3 / Phi-4-mini): only the first ``rotary_dim`` dims rotate, the rest pass."""
    n = cos.shape[-1]
    if n < x.shape[-1]:
        return torch.cat([rotary(x[..., :n], cos, sin), x[..., n:]], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[..., None, :] + torch.cat([-x2, x1], dim=-1) * sin[..., None, :]


def is_rotary(model: Any) -> bool:
    """Whether the model rotates queries and keys (RoPE) rather than adding learned positions."""
    return model.cfg.positional_embedding_type == "rotary"


def check_rotary(model: Any, cos: torch.Tensor) -> None:
    """RoPE the rules cover: rotate-half, on every dim or (families whose row says so) the first ``rotary_dim``."""
    cfg = model.cfg
    if getattr(cfg, "rotary_adjacent_pairs", False) or getattr(cfg, "rotary_interleaved_cos_sin", False):
        raise UnsupportedOperationError("adjacent-pair (interleaved) rotary embeddings have no CD-T rule")
    if cos.shape[-1] != cfg.d_head and architecture(model).rotary != "partial":
        raise UnsupportedOperationError(f"partial rotary embeddings ({cos.shape[-1]} of {cfg.d_head} dims) are not "
                                        f"expected for {cfg.architecture}: no CD-T rule")


def allowed_keys(attention_mask: torch.Tensor, window: int | None = None) -> Bool[torch.Tensor, "batch 1 q k"]:
    """Causal and non-padding keys for every query: what a β pattern may attend to.

    ``window``: a sliding-window layer also hides keys ``window`` or more positions back
    (``q - k < window``, as transformers masks it)."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def check_keys(pattern: torch.Tensor, allowed: torch.Tensor, real_queries: torch.Tensor, layer: int) -> None:
    """The real pattern must attend only to keys the rules allow (causal, real, in the window): every
    rule reads it there or recomputes a softmax over those keys."""
    stray = pattern.masked_fill(allowed | ~real_queries[:, None, :, None], 0)
    if bool(stray.ne(0).any()):
        raise UnsupportedOperationError(f"layer {layer}'s real attention reaches keys outside the causal / "
                                        "sliding-window mask that the CD-T rules assume for this architecture")
