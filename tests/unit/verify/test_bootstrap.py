"""Percentile bootstrap: seeded, exact for constant data, intervals that cover their point estimate."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import VerifyError
from circuitlab.verify.bootstrap import Bootstrap, Interval


def test_constant_values_give_a_point_interval_and_one_prompt_too():
    assert Bootstrap(5, 100).mean(torch.full((5,), 2.5)) == Interval(2.5, 2.5, 2.5)
    assert Bootstrap(1, 100).mean(torch.tensor([3.0])) == Interval(3.0, 3.0, 3.0)


def test_the_interval_covers_the_mean_and_is_seeded():
    values = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = Bootstrap(40, 500, seed=3).mean(values), Bootstrap(40, 500, seed=3).mean(values)
    assert a == b and a.low < a.value < a.high
    assert a.value == pytest.approx(float(values.mean()), abs=16 * torch.finfo(torch.float64).eps)
    # a standard normal sample of 40: the 95% interval of the mean is about +-1.96 / sqrt(40) wide
    assert 0.3 < a.high - a.low < 1.0
    assert Bootstrap(40, 500, seed=4).mean(values) != a


def test_ratio_statistic_with_several_rows_and_undefined_resamples():
    rows = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.7, 0.6]], dtype=torch.float64)
    (f,) = Bootstrap(3, 200).intervals(rows, lambda m: ((m[2:] - m[1]) / (m[0] - m[1])))
    assert f.value == pytest.approx(0.6) and f.low <= f.value <= f.high
    undefined = Bootstrap(2, 50).interval(torch.zeros(2, 2, dtype=torch.float64), lambda m: m[0] / m[1])
    assert undefined.value != undefined.value  # NaN point: no interval either
    assert undefined.low != undefined.low


def test_bad_resample_counts_are_clear_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(VerifyError, match="n_bootstrap"):
            Bootstrap(4, bad)  # type: ignore[arg-type]
    with pytest.raises(VerifyError, match="prompts"):
        Bootstrap(4, 10).mean(torch.ones(3))
