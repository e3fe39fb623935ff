"""CD-T rules for an element-wise product ``a ⊙ u`` (the ``product`` field of ``cdt.rules.Rules``):
a gated MLP's gate times its up projection (SwiGLU, GeGLU)."""

from __future__ import annotations

from typing import Callable

from ctsft_lens.cdt.split import Split


def legacy(a: Split, u: Split) -> Split:
    """β gets ``β_a β_u + β_a γ_u + γ_a β_u``, γ gets ``γ_a γ_u``: the exact removal, quadratic in β
    (once β and γ hold large cancelling parts, the product squares them)."""
    return Split(a.beta * (u.beta + u.gamma) + a.gamma * u.beta, a.gamma * u.gamma)


def shapley(a: Split, u: Split) -> Split:
    """The cross terms split equally (the Shapley value of the two streams):
    ``β' = ½(β_a ⊙ u + a ⊙ β_u)``, ``γ' = ½(γ_a ⊙ u + a ⊙ γ_u)`` with ``a``, ``u`` the totals: linear
    in β (no ``β²`` term to compound), half the derivative."""
    ta, tu = a.beta + a.gamma, u.beta + u.gamma
    return Split(0.5 * (a.beta * tu + ta * u.beta), 0.5 * (a.gamma * tu + ta * u.gamma))


def linear(a: Split, u: Split) -> Split:
    """The product rule of the derivative: ``β' = β_a ⊙ u + a ⊙ β_u`` with ``a``, ``u`` the totals,
    ``γ' = a ⊙ u − β'``."""
    ta, tu = a.beta + a.gamma, u.beta + u.gamma
    beta = a.beta * tu + ta * u.beta
    return Split(beta, ta * tu - beta)


RULES: dict[str, Callable[[Split, Split], Split]] = {"legacy": legacy, "shapley": shapley, "linear": linear}
"""Product rules by name (``Rules.product``)."""


def product(a: Split, u: Split, rule: str = "legacy") -> Split:
    """``a ⊙ u`` on the split streams by ``rule`` (:data:`RULES`)."""
    return RULES[rule](a, u)
