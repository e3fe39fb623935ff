"""Whether a propagation can be trusted: every split is checked against the real forward at the
hooks the cache holds (:class:`Health`), and an unstable source is always named, never silently
ranked (:func:`report_unstable`)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float

from ctsft_lens.cdt.rules import DEFAULT_PRESET, Rules
from ctsft_lens.cdt.split import Split
from ctsft_lens.errors import CtsftError

RECON_TOL = 1e-4
"""Largest ``max|β + γ - real| / max|real|`` at a checked hook before a source counts as unstable."""
LOW_PRECISION_RECON_TOL = 5e-2
"""``RECON_TOL`` for a bfloat16 / float16 model: its own rounding is ~1e-2 of an activation (docs/method.md)."""
BETA_LIMIT = 100.0
"""Largest ``max|β| / max|real|`` at a checked hook: beyond it β and γ are cancelling parts a
hundred times the activation, and float32 scores are differences of huge numbers."""


class Health(NamedTuple):
    """Per source, over every checked hook: all finite, worst relative reconstruction error, worst max|β|/max|real|."""

    finite: Bool[torch.Tensor, " source"]
    recon: Float[torch.Tensor, " source"]
    beta_scale: Float[torch.Tensor, " source"]

    def unstable(self, tol: float = RECON_TOL, beta_limit: float = BETA_LIMIT) -> Bool[torch.Tensor, " source"]:
        return ~self.finite | ~(self.recon <= tol) | ~(self.beta_scale <= beta_limit)

    def merge(self, other: "Health") -> "Health":
        return Health(self.finite & other.finite, torch.maximum(self.recon, other.recon),
                      torch.maximum(self.beta_scale, other.beta_scale))

    @classmethod
    def good(cls, n: int) -> "Health":
        """``n`` sources not checked yet: finite, no error."""
        return cls(torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64),
                   torch.zeros(n, dtype=torch.float64))


def health_at(x: Split, real: torch.Tensor) -> Health:
    """Compare a split ``[source, ...]`` with the real activation ``[...]`` (NaN counts as +inf)."""
    beta, gamma = x.beta.flatten(1), x.gamma.flatten(1)
    real = real.to(beta.dtype).flatten()
    scale = real.abs().max().clamp_min(torch.finfo(beta.dtype).tiny)
    finite = torch.isfinite(beta).all(1) & torch.isfinite(gamma).all(1)
    recon = ((beta + gamma) - real).abs().amax(1).div(scale).nan_to_num(float("inf"))
    return Health(finite.cpu(), recon.double().cpu(), beta.abs().amax(1).div(scale).nan_to_num(float("inf")).double().cpu())


def recon_tol(model: Any) -> float:
    """The β+γ tolerance for ``model``'s weights dtype: ``RECON_TOL`` in float32, looser in bf16/fp16."""
    dtype = next(model.parameters()).dtype
    return LOW_PRECISION_RECON_TOL if dtype in (torch.bfloat16, torch.float16) else RECON_TOL


class UnstableDecompositionError(CtsftError):
    """CD-T β/γ of some source heads went non-finite or left the real forward; ``heads`` names them."""

    def __init__(self, message: str, heads: Sequence[tuple[int, int]]) -> None:
        super().__init__(message)
        self.heads = tuple(heads)


class UnstableDecompositionWarning(RuntimeWarning):
    """Like :class:`UnstableDecompositionError`, when not strict."""


def unstable_message(heads: Sequence[tuple[int, int]], rules: Rules, tol: float = RECON_TOL) -> str:
    """One line naming the unstable source heads."""
    names = ", ".join(f"{layer}.{head}" for layer, head in heads)
    return (f"CD-T decomposition ({rules.spec()!r}) is unstable for {len(heads)} source head(s): {names} "
            f"(non-finite β/γ, β+γ off the real forward by > {tol:g} of its scale, or |β| over "
            f"{BETA_LIMIT:g}x the activation); their scores "
            f"are unreliable. Try decomposition='{DEFAULT_PRESET}', 'linear' or a float64 rule set.")


def report_unstable(heads: Sequence[tuple[int, int]], rules: Rules, strict: bool) -> None:
    """Raise (``strict``) or warn, naming ``heads``; nothing when there are none."""
    if not heads:
        return
    message = unstable_message(heads, rules)
    if strict:
        raise UnstableDecompositionError(message, heads)
    warnings.warn(message, UnstableDecompositionWarning, stacklevel=3)
