"""CD-T rules for an element-wise function (the ``activation`` field of ``cdt.rules.Rules``): the
MLP's activation (SiLU, GELU...) and Gemma 2's final-logit soft-cap.

A rule takes the split input, ``f`` and, when known, the real ``f(β + γ)`` (``total``)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ctsft_lens.cdt.split import Split
from ctsft_lens.models.architectures import architecture, soft_caps

Fn = Callable[[torch.Tensor], torch.Tensor]


def difference(x: Split, f: Fn, total: torch.Tensor | None = None) -> Split:
    """``γ' = f(γ)``, ``β' = f(β + γ) − f(γ)``: the exact removal of β, element-wise."""
    fg = f(x.gamma)
    return Split((f(x.beta + x.gamma) if total is None else total.to(fg.dtype)) - fg, fg)


def linear(x: Split, f: Fn, total: torch.Tensor | None = None) -> Split:
    """``β' = f′(β + γ) ⊙ β``, ``γ' = f(β + γ) − β'``: the derivative."""
    xt = x.beta + x.gamma
    with torch.enable_grad():
        leaf = xt.detach().requires_grad_(True)
        y = f(leaf)
        (slope,) = torch.autograd.grad(y.sum(), leaf)  # element-wise f: the diagonal of its Jacobian
    beta = slope * x.beta
    return Split(beta, (y.detach() if total is None else total.to(beta.dtype)) - beta)


RULES: dict[str, Callable[[Split, Fn, torch.Tensor | None], Split]] = {"difference": difference, "linear": linear}
"""Activation rules by name (``Rules.activation``)."""


def activation(x: Split, f: Fn, total: torch.Tensor | None = None, rule: str = "difference") -> Split:
    """``f`` on the split ``x`` by ``rule`` (:data:`RULES`); ``total``: the real ``f(β + γ)``, when known."""
    return RULES[rule](x, f, total)


def act_fn(model: Any, layer: int) -> Fn:
    """The HF MLP's own activation (SiLU for SwiGLU, GELU-tanh for Gemma's GeGLU, ...)."""
    return getattr(model.blocks[layer].mlp.original_component, architecture(model).act_attr)


def logit_cap(model: Any, logits: Split, rule: str = "difference") -> Split:
    """Final-logit soft-capping ``c·tanh(x/c)`` (Gemma 2) as an element-wise activation; the identity elsewhere."""
    cap = soft_caps(model)[1]
    return logits if cap is None else activation(logits, lambda t: torch.tanh(t / cap) * cap, rule=rule)
