"""CD-T rules for a norm (the ``norm`` field of ``cdt.rules.Rules``), and where the families put norms.

Every norm divides by the *total*'s scale from the real forward (its ``hook_scale``), on the
centred streams for LayerNorm; RMSNorm, Gemma's ``1 + w``, post-sublayer norms and q/k norms
alike. Which family has which norm is ``ctsft_lens.models.architectures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ctsft_lens.cdt.bias import add_bias
from ctsft_lens.cdt.rules import Rules
from ctsft_lens.cdt.split import Emit, Split
from ctsft_lens.models.architectures import architecture


@dataclass(frozen=True)
class Norm:
    """One norm at one place: the total's ``scale``, ``weight`` (the family's offset included),
    ``bias``, whether it is an RMSNorm, the trailing dims it covers (``over``) and its ``eps``."""

    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rms: bool
    over: tuple[int, ...]
    eps: float

    def centre(self, x: Split) -> Split:
        """The streams a LayerNorm sees (each centred); an RMSNorm's as they are."""
        if self.rms:
            return x
        return Split(x.beta - x.beta.mean(self.over, keepdim=True), x.gamma - x.gamma.mean(self.over, keepdim=True))


def frozen(x: Split, n: Norm, bias_rule: str) -> Split:
    """``w ⊙ β / s`` with the total's scale s (the public CD-T code's ``prop_layer_norm``); the norm's
    bias by ``|β| : |γ|`` of its input (``bias_rule``)."""
    b, g = n.centre(x)
    return add_bias(b / n.scale * n.weight, g / n.scale * n.weight, n.bias, bias_rule, by=x)


def jacobian(x: Split, n: Norm, bias_rule: str) -> Split:
    """β' = the norm's derivative at the total x applied to β, ``w ⊙ (β − x̂⟨x̂, β⟩/d) / s`` with
    ``x̂ = x / s``: the component of β along x, which the norm removes, is removed."""
    b, g = n.centre(x)
    xt = b + g
    unit = xt / n.scale
    d = 1
    for i in n.over:
        d *= xt.shape[i]
    beta = (b - unit * (unit * b).sum(n.over, keepdim=True) / d) / n.scale * n.weight
    out = unit * n.weight if n.bias is None else unit * n.weight + n.bias
    return Split(beta, out - beta)


def difference(x: Split, n: Norm, bias_rule: str) -> Split:
    """γ' = norm(γ) with γ's own scale, β' = norm(x) − norm(x − β): the exact removal of β, bounded
    by the norm's output whatever β's size; exactly 0 where β is."""
    b, g = n.centre(x)

    def own(t: torch.Tensor) -> torch.Tensor:
        y = t / (t.pow(2).mean(n.over, keepdim=True) + n.eps).sqrt() * n.weight
        return y if n.bias is None else y + n.bias

    gamma = own(g)
    return Split(own(b + g) - gamma, gamma)


RULES: dict[str, Callable[[Split, Norm, str], Split]] = {"frozen": frozen, "jacobian": jacobian,
                                                         "difference": difference}
"""Norm rules by name (``Rules.norm``)."""


def norm(x: Split, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, rms: bool,
         rule: str = "frozen", bias_rule: str = "share", dims: int = 1, eps: float = 1e-6) -> Split:
    """LayerNorm / RMSNorm of ``x`` by ``rule`` (:data:`RULES`) with the total's ``scale`` (``hook_scale``
    of the real forward). ``dims``: how many trailing dims the norm covers (OLMo-2's q/k norm spans
    every head); ``eps``: the norm's."""
    dtype = x.beta.dtype
    n = Norm(scale.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), rms,
             tuple(range(-dims, 0)), eps)
    return RULES[rule](x, n, bias_rule)


def norm_module(model: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None, bool, float]:
    """Weight (with the family's offset: Gemma's ``1 + w``), bias, RMS-ness and eps of norm ``name``."""
    row = architecture(model)
    mod = model.ln_final if name == "ln_final" else model.get_submodule(name)
    rms = row.norm == "rms"
    hf = getattr(mod, "original_component", None)
    eps = getattr(hf, "variance_epsilon", None) or getattr(hf, "eps", None) or model.cfg.eps
    return (mod.w + row.norm_offset if row.norm_offset else mod.w), (None if rms else mod.b), rms, float(eps)


def model_norm(model: Any, cache: Any, name: str, x: Split, keep: slice, p0: int, rules: Rules) -> Split:
    """Norm ``name`` of the model (``ln_final``, ``blocks.L.ln1``...) on ``x`` under ``rules``, with the
    total's ``hook_scale`` over positions ``p0:``, then ``keep``."""
    w, b, rms, eps = norm_module(model, name)
    return norm(x, cache[f"{name}.hook_scale"][:, p0:][:, keep], w, b, rms=rms, rule=rules.norm,
                bias_rule=rules.bias, eps=eps)


def pre_norm(model: Any, cache: Any, name: str, x: Split, keep: slice, emit: Emit, p0: int, rules: Rules) -> Split:
    """``ln1``/``ln2`` before a sublayer; the identity where the family has none (OLMo-2: the
    sublayers read the residual stream)."""
    if not architecture(model).pre_norms:
        return x
    out = model_norm(model, cache, name, x, keep, p0, rules)
    emit(f"{name}.hook_out", out)
    return out


def post_norm(model: Any, cache: Any, name: str, x: Split, keep: slice, emit: Emit, p0: int, rules: Rules) -> Split:
    """``ln1_post``/``ln2_post`` (Gemma 2/3, OLMo-2): a norm of the sublayer's output before the
    residual add, divided by the *total* output's scale; the identity elsewhere. Emits the
    sublayer's raw output first."""
    if not architecture(model).post_norms:
        return x
    emit(name.replace("ln1_post", "attn").replace("ln2_post", "mlp") + ".hook_out", x)
    return model_norm(model, cache, name, x, keep, p0, rules)


def qk_norm(model: Any, cache: Any, pre: str, q: Split, k: Split, keep: slice, emit: Emit, p0: int,
            rules: Rules) -> tuple[Split, Split]:
    """RMSNorm of q and k before RoPE (Qwen3, Gemma 3: per head over ``d_head``; OLMo-2: over the
    whole projection) with the totals' scales from the real forward; the identity elsewhere.

    OLMo-2's normed q/k are emitted as ``attn.hook_q_normed`` / ``hook_k_normed`` (``[..., pos,
    head·d_head]``, the bridge's layout). The bridge keeps per-head ones as ``[batch, head, pos,
    d_head]``, not the ``[..., pos, ...]`` layout every emitted split has: not emitted (the
    rotated ``hook_rot_q`` / ``hook_rot_k`` that follow them are)."""
    row = architecture(model)
    if row.qk_norm is None:
        return q, k
    out = []
    for name, x, pos in (("q", q, keep), ("k", k, slice(None))):
        w, _, _, eps = norm_module(model, f"{pre}.attn.{name}_norm")
        scale = cache[f"{pre}.attn.{name}_norm.hook_scale"]
        if row.qk_norm == "head":  # [B, head, pos, 1] -> [B, pos, head, 1]
            y = norm(x, scale.transpose(1, 2)[:, p0:][:, pos], w, None, rms=True, rule=rules.norm, eps=eps)
        else:  # [B, pos, 1] over all heads; the weight holds one slice per head
            y = norm(x, scale[:, p0:][:, pos, None], w.view(-1, x.beta.shape[-1]), None, rms=True, rule=rules.norm,
                     dims=2, eps=eps)
            emit(f"{pre}.attn.hook_{name}_normed", Split(y.beta.flatten(-2), y.gamma.flatten(-2)))
        out.append(y)
    return out[0], out[1]
