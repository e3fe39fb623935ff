"""Intervals over seeds and examples (issue #37), on small constructed tables."""

from __future__ import annotations

import pytest
import torch

from ctsft_lens.errors import CtsftError
from ctsft_lens.statistics import Interval, detectable_effect, paired_interval


def test_seed_variance_shows_only_when_seeds_are_resampled():
    """Three seeds whose gains are +0.2, 0 and -0.2 on every example: over examples alone the
    interval is a point (every example agrees); over seeds it spans most of the seeds' spread."""
    diffs = torch.tensor([[0.2] * 50, [0.0] * 50, [-0.2] * 50], dtype=torch.float64)
    examples = paired_interval(diffs, resample_seeds=False, n_boot=4000)
    both = paired_interval(diffs, resample_seeds=True, n_boot=4000)
    assert examples.estimate == pytest.approx(0.0, abs=1e-12)
    assert examples.width == pytest.approx(0.0, abs=1e-12)
    assert both.lo <= -0.13 and both.hi >= 0.13  # 3 seeds: means of 3 draws from {-0.2, 0, 0.2}
    assert both.lo >= -0.2 - 1e-9 and both.hi <= 0.2 + 1e-9


def test_identical_seeds_give_the_example_interval():
    """With no spread over seeds, resampling them changes nothing but the draw."""
    g = torch.Generator().manual_seed(1)
    row = (torch.rand(200, generator=g) < 0.55).double() - (torch.rand(200, generator=g) < 0.45).double()
    diffs = row.expand(4, -1)
    a = paired_interval(diffs, resample_seeds=False, n_boot=3000)
    b = paired_interval(diffs, resample_seeds=True, n_boot=3000)
    assert a.estimate == b.estimate == pytest.approx(float(row.mean()))
    assert a.lo == pytest.approx(b.lo, abs=1e-9) and a.hi == pytest.approx(b.hi, abs=1e-9)
    assert a.lo < a.estimate < a.hi


def test_detectable_effect_is_2_8_standard_errors():
    half = 1.959963984540054 * 0.01  # a 95 % interval of SE 0.01
    assert detectable_effect(Interval(0.0, -half, half)) == pytest.approx(2.8016 * 0.01, rel=1e-3)


@pytest.mark.parametrize("bad", [torch.zeros(0, 3), torch.zeros(3), [[]]])
def test_bad_tables_are_one_clear_error(bad):
    with pytest.raises(CtsftError, match="n_seeds >= 1, n_examples >= 1"):
        paired_interval(bad, resample_seeds=True)
