"""CD-T rules for a bias (the ``bias`` and ``bias_o`` fields of ``cdt.rules.Rules``), and the
linear maps that carry one.

A rule takes the two streams of ``xW`` (``wb``, ``wg``) and the bias, and says which stream gets
how much of it; ``by``: the split whose ``|β| : |γ|`` shares it, when not ``wb : wg`` (a norm's
bias goes by its input). Where both streams are 0 a shared bias goes wholly to γ, so the split
stays exact (the public code adds ``1e-8`` instead).
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float

from ctsft_lens.cdt.split import Split


def share(wb: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor, by: Split | None = None) -> Split:
    """b split by ``|wb| : |wg|`` (or ``|by.beta| : |by.gamma|``): the public CD-T code's ``prop_linear``."""
    ab, ag = (wb.abs(), wg.abs()) if by is None else (by.beta.abs(), by.gamma.abs())
    den = ab + ag
    frac = torch.where(den > 0, ab / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return Split(wb + bias * frac, wg + bias * (1 - frac))


def gamma(wb: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor, by: Split | None = None) -> Split:
    """b wholly to γ: the linear rule (β stays the derivative)."""
    return Split(wb, wg + bias)


RULES: dict[str, Callable[..., Split]] = {"share": share, "gamma": gamma}
"""Bias rules by name (``Rules.bias``, ``Rules.bias_o``)."""


def add_bias(wb: torch.Tensor, wg: torch.Tensor, bias: torch.Tensor | None, rule: str,
             by: Split | None = None) -> Split:
    """``bias`` added to the streams ``wb``, ``wg`` by ``rule`` (:data:`RULES`); none: the streams as they are."""
    return Split(wb, wg) if bias is None else RULES[rule](wb, wg, bias, by)


def linear(x: Split, weight: Float[torch.Tensor, "d_in d_out"], bias: torch.Tensor | None,
           out: torch.Tensor | None = None, bias_rule: str = "share") -> Split:
    """``x W + b`` on both streams.

    ``out``: the real ``(β + γ) W + b`` from the forward; then γ's matmul is skipped
    (``γW = out - b - βW``), the β-only fast path.
    """
    dtype = x.beta.dtype
    weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    wb = x.beta @ weight
    if out is None:
        return add_bias(wb, x.gamma @ weight, bias, bias_rule)
    out = out.to(dtype)
    if bias is not None:
        wb = add_bias(wb, out - bias - wb, bias, bias_rule).beta
    return Split(wb, out - wb)  # γ = real − β: where β is 0, γ is the real output bit for bit


def linear_heads(x: Split, weight: Float[torch.Tensor, "head d_model d_head"],
                 bias: Float[torch.Tensor, "head d_head"] | None, out: torch.Tensor | None = None,
                 bias_rule: str = "share") -> Split:
    """Per-head projection (``W_Q``/``W_K``/``W_V``): ``[..., pos, d_model] -> [..., pos, head, d_head]``."""
    n_heads, d_model, d_head = weight.shape
    flat = weight.permute(1, 0, 2).reshape(d_model, n_heads * d_head)
    res = linear(x, flat, None if bias is None else bias.reshape(-1), None if out is None else out.flatten(-2),
                 bias_rule)
    return Split(*(t.unflatten(-1, (n_heads, d_head)) for t in res))
