"""Intervals for paired comparisons of trained runs: over test examples, and over seeds *and* examples.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import torch

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
    """The central ``level`` percentile interval of bootstrap replicates."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples.double(), q).tolist()
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
