"""The statistics every study reports: bootstrap intervals, rank correlation, and how stable a
ranking is over its sample.

Intervals for paired comparisons of trained runs: over test examples, and over seeds *and* examples.

A transfer cell is one training run (a seed: its training sample, its shuffle, its random heads)
scored on one test set. The gain of an arm over a reference, paired by seed and by example, has
two sources of error: which test examples were drawn, and which training runs. A bootstrap over
examples alone (:func:`paired_interval` with ``resample_seeds=False``) gives the test-set error
of *these* runs; resampling the seeds as well (``True``, a two-stage bootstrap: seeds with
replacement, then examples with replacement, the same examples for every seed because the runs
share one test set) gives the error a reader needs to generalise over training runs. With 3
seeds the seed stage is coarse (10 distinct multisets), so report both, with the per-seed gains.

:func:`detectable_effect` turns an interval's width into the smallest effect the run could have
seen: the standard ``(z_{1-alpha/2} + z_{power}) * SE`` with ``SE = width / (2 z_{1-alpha/2})``.

Rankings of heads: :func:`spearman` (ties averaged, unscored heads left out) compares two score
tables; :func:`split_half_stability` asks how much one depends on its discovery sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Sequence

import torch
from jaxtyping import Float

from ctsft_lens.circuit import rank_heads
from ctsft_lens.errors import CtsftError


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile interval."""

    estimate: float
    lo: float
    hi: float
    level: float = 0.95

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def text(self) -> str:
        return f"{self.estimate:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def percentile_interval(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates. A NaN replicate (a resample
    where the statistic is undefined, e.g. a ratio over a zero span) is left out; NaNs if none is left."""
    s = samples.double().flatten()
    s = s[~torch.isnan(s)]
    if len(s) == 0:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(s, q).tolist()
    return lo, hi


def paired_interval(diffs: Sequence[Sequence[float]] | torch.Tensor, *, resample_seeds: bool, n_boot: int = 2000,
                    boot_seed: int = 0, level: float = 0.95) -> Interval:
    """The mean of ``diffs`` (``[n_seeds, n_examples]``: per seed, per test example, arm minus its
    paired reference) with a bootstrap interval over examples, and over seeds too when
    ``resample_seeds``. Examples are resampled with one index set per replicate, shared by every
    seed (the runs were scored on the same examples), so the example pairing is kept."""
    d = torch.as_tensor(diffs, dtype=torch.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise CtsftError(f"diffs must be [n_seeds >= 1, n_examples >= 1], got shape {tuple(d.shape)}")
    if n_boot < 1:
        raise CtsftError(f"n_boot must be >= 1, got {n_boot}")
    n_seeds, n_ex = d.shape
    gen = torch.Generator().manual_seed(boot_seed)
    ex = torch.randint(n_ex, (n_boot, n_ex), generator=gen)
    per_seed = d[:, ex].mean(-1).T  # [n_boot, n_seeds]: each seed's mean over the replicate's examples
    if resample_seeds:
        seeds = torch.randint(n_seeds, (n_boot, n_seeds), generator=gen)
        reps = per_seed.gather(1, seeds).mean(1)
    else:
        reps = per_seed.mean(1)
    lo, hi = percentile_interval(reps, level)
    return Interval(float(d.mean()), lo, hi, level)


def detectable_effect(interval: Interval, power: float = 0.8) -> float:
    """The smallest true effect a comparison with this interval would detect (its interval excluding
    0) with probability ``power``, under a normal approximation of the bootstrap distribution."""
    z = NormalDist().inv_cdf((1 + interval.level) / 2)
    se = interval.width / (2 * z)
    return (z + NormalDist().inv_cdf(power)) * se


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inverse, ranks)
    return (sums / counts.to(x.dtype))[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two score tables over the heads both scored (NaN if undefined)."""
    a, b = a.double().flatten(), b.double().flatten()
    ok = ~(torch.isnan(a) | torch.isnan(b))
    if int(ok.sum()) < 2:
        return math.nan
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def split_half_stability(per_example: Float[torch.Tensor, "n_examples n_layers n_heads"], labels: Sequence[int],
                         ks: Sequence[int], *, splits: int = 20, seed: int = 0) -> dict[str, Any]:
    """How much a ranking depends on its discovery sample: ``splits`` times, the examples are cut into
    two disjoint label-balanced halves and each half ranks the heads by its mean table. Per ``k``:
    the share of one half's top-k heads that are also the other's (mean, min, max over splits; two
    random top-k sets share ``k / n_heads`` on average, the ``chance`` entry), and the Spearman
    correlation of the two halves' tables."""
    n = per_example.shape[0]
    if len(labels) != n:
        raise CtsftError(f"{len(labels)} labels for {n} examples")
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(int(y), []).append(i)
    if min(len(v) for v in by_label.values()) < 2:
        raise CtsftError("every label needs at least two examples to split the sample in halves")
    n_scored = int((~torch.isnan(per_example[0])).sum())
    gen = torch.Generator().manual_seed(seed)
    overlaps: dict[int, list[float]] = {int(k): [] for k in ks}
    rhos: list[float] = []
    for _ in range(splits):
        a, b = [], []
        for idx in by_label.values():
            perm = [idx[int(j)] for j in torch.randperm(len(idx), generator=gen)]
            half = len(perm) // 2
            a += perm[:half]
            b += perm[half:2 * half]
        ta, tb = per_example[a].mean(0), per_example[b].mean(0)
        ra, rb = rank_heads(ta), rank_heads(tb)
        for k in overlaps:
            overlaps[k].append(len(set(ra[:k]) & set(rb[:k])) / k)
        rhos.append(spearman(ta, tb))

    def summary(xs: list[float]) -> dict[str, float]:
        return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}

    return {"n_half": len(a), "splits": splits, "n_heads": n_scored,
            "overlap": {str(k): {**summary(v), "chance": k / n_scored} for k, v in overlaps.items()},
            "spearman": summary(rhos)}
