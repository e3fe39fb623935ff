"""CD-T rules for the public code's sign clean-up (the ``normalize`` field of ``cdt.rules.Rules``):
at which places of a layer ``normalize_rel_irrel`` runs.

A rule takes the place (``"attn_out"``, ``"resid_mid"``, ``"mlp_in"``, ``"mlp_out"``,
``"resid_post"``: after the attention output linear, the attention's residual add, each MLP input
linear, the MLP output linear, the MLP's residual add) and the split there."""

from __future__ import annotations

from typing import Callable

import torch

from ctsft_lens.cdt.split import Split


def normalize_rel_irrel(x: Split) -> Split:
    """Public CD-T sign clean-up: where β and γ differ in sign, the larger takes the total, the other 0.

    Same as clamping β into ``[min(0, total), max(0, total)]``: ``|β|, |γ| <= |total|`` after it.
    """
    total = x.beta + x.gamma
    conflict = (x.beta * x.gamma) < 0
    beta_wins = conflict & (x.beta.abs() >= x.gamma.abs())
    gamma_wins = conflict & ~beta_wins
    zero = torch.zeros_like(total)
    return Split(torch.where(beta_wins, total, torch.where(gamma_wins, zero, x.beta)),
                 torch.where(gamma_wins, total, torch.where(beta_wins, zero, x.gamma)))


def none(place: str, x: Split) -> Split:
    """No clean-up."""
    return x


def bert(place: str, x: Split) -> Split:
    """After the attention output, the MLP output and both residual adds (the BERT code's places; ctsft_lens 0.2)."""
    return normalize_rel_irrel(x) if place in ("attn_out", "resid_mid", "mlp_out", "resid_post") else x


def gpt(place: str, x: Split) -> Split:
    """After each MLP input linear, the MLP output linear and the MLP residual add (``prop_GPT_layer``'s places)."""
    return normalize_rel_irrel(x) if place in ("mlp_in", "mlp_out", "resid_post") else x


RULES: dict[str, Callable[[str, Split], Split]] = {"none": none, "bert": bert, "gpt": gpt}
"""Clean-up rules by name (``Rules.normalize``)."""
