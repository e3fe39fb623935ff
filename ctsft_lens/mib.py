"""MIB's circuit-localisation summary, computed on our mean ablation, to set beside the leaderboard.

MIB (Mueller et al., 2025; its ``evaluate_area_under_curve``) keeps the top ``int(p · n)`` of the
``n`` *scored* nodes for ten fixed fractions p = 0.001 … 1, measures
f = (m(C) − m(∅)) / (m(M) − m(∅)) for each, and integrates with the trapezoid rule over p itself
(no point at p = 0, no anchoring). CPR is the area under f with nodes ranked by their signed
score; CMD is the area under |1 − f| with nodes ranked by |score|. Our curves
(``faithfulness.Curve``) differ: sizes from ``size_grid`` (dense at the small end), the exact end
points f(0) = 0 and f(1) = 1 added, one signed ranking for both summaries. Unscored heads (NaN)
are not ranked and do not count in n, as in MIB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from ctsft_lens.circuit import rank_heads
from ctsft_lens.faithfulness import MeanAblation

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The ten fractions of scored nodes at which MIB measures faithfulness."""


def mib_sizes(n_scored: int) -> list[int]:
    """Heads kept at each MIB fraction: ``int(p * n_scored)`` (0 for the smallest fractions of a small model)."""
    return [int(p * n_scored) for p in MIB_FRACTIONS]


def mib_area(values: list[float] | tuple[float, ...]) -> float:
    """Trapezoid area over ``MIB_FRACTIONS`` (raw fractions, first point 0.001, no point at 0)."""
    return sum((MIB_FRACTIONS[i + 1] - MIB_FRACTIONS[i]) * (values[i] + values[i + 1]) / 2
               for i in range(len(MIB_FRACTIONS) - 1))


@dataclass(frozen=True)
class MibCurve:
    """Faithfulness at MIB's ten fractions: ``signed`` (ranked by score, for CPR) and ``absolute``
    (ranked by |score|, for CMD)."""

    name: str
    n_scored: int
    sizes: tuple[int, ...]
    signed: tuple[float, ...]
    absolute: tuple[float, ...]

    @property
    def cpr(self) -> float:
        """Area under f, signed ranking (higher is better)."""
        return mib_area(self.signed)

    @property
    def cmd(self) -> float:
        """Area under |1 − f|, |score| ranking (lower is better)."""
        return mib_area([abs(1 - v) for v in self.absolute])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "protocol": "mib", "fractions": list(MIB_FRACTIONS), "n_scored": self.n_scored,
                "sizes": list(self.sizes), "f_signed": list(self.signed), "f_absolute": list(self.absolute),
                "cpr": self.cpr, "cmd": self.cmd}


def mib_curve(ab: MeanAblation, scores: Float[torch.Tensor, "n_layers n_heads"], name: str = "mib") -> MibCurve:
    """MIB's CPR / CMD curve of a head score table under ``ab``'s mean ablation."""
    n_scored = int((~torch.isnan(scores.double())).sum())
    if n_scored == 0:
        raise ValueError(f"{name}: no head is scored")
    sizes = mib_sizes(n_scored)
    signed, absolute = rank_heads(scores), rank_heads(scores, absolute=True)
    keeps = torch.stack([ab.table(signed[:k]) for k in sizes] + [ab.table(absolute[:k]) for k in sizes])
    f = [ab.faithfulness(m) for m in ab.metrics_many(keeps)]
    f = [0.0 if k == 0 and not math.isnan(v) else v for k, v in zip(sizes + sizes, f)]  # empty circuit: 0 exactly
    return MibCurve(name, n_scored, tuple(sizes), tuple(f[:len(sizes)]), tuple(f[len(sizes):]))
