"""Quadrature rules against Captum's `approximation_methods` (both computed in float64)."""

from __future__ import annotations

import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters

from circuitlab.attribution.quadrature import quadrature
from circuitlab.errors import AttributionError

from .toys import EPS32, EPS64

# Ours are float64 (a linspace, a division, numpy's leggauss): a few ulps of values in [0, 1]. Captum's
# weights are Python floats (float64) and its Gauss-Legendre points numpy's; its Riemann points come from a
# float32 torch.linspace, i.e. within a few float32 ulps (eps32 at values <= 1) of the exact ones.
ULPS = 16 * EPS64
POINTS32 = 4 * EPS32


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"])
def test_quadrature_matches_captum(rule):
    steps_fn, alphas_fn = approximation_parameters(rule)
    alphas, weights = quadrature(rule, 9)
    atol = ULPS if rule == "gausslegendre" else POINTS32
    assert torch.allclose(alphas, torch.tensor(alphas_fn(9), dtype=torch.float64), rtol=0, atol=atol)
    assert torch.allclose(weights, torch.tensor(steps_fn(9), dtype=torch.float64), rtol=0, atol=ULPS)


def test_trapezoid_weights_sum_to_one():
    steps_fn, _ = approximation_parameters("riemann_trapezoid")
    _, weights = quadrature("riemann_trapezoid", 8)
    assert float(weights.sum()) == pytest.approx(1.0, rel=0, abs=ULPS)
    assert torch.allclose(weights, torch.tensor(steps_fn(8), dtype=torch.float64) * 8 / 7, rtol=0, atol=ULPS)


@pytest.mark.parametrize(("rule", "steps", "message"), [
    ("simpson", 4, "unknown integration rule"), ("gausslegendre", 0, "steps >= 1"),
    ("riemann_trapezoid", 1, "steps >= 2"), ("gausslegendre", 2.5, "an integer"), ("gausslegendre", True, "an integer"),
])
def test_quadrature_bad_input(rule, steps, message):
    with pytest.raises(AttributionError, match=message):
        quadrature(rule, steps)
