"""Quadrature rules on [0, 1] for path integrals (integrated gradients): interpolation points and weights.

Points and weights equal Captum's `approximation_methods` for the Riemann left/right/middle rules and
Gauss-Legendre. The trapezoid rule differs on purpose: Captum places n points on [0, 1] but weights them
1/n (halved at the ends), so its weights sum to 1 - 1/n; here the weights are 1/(n-1) (halved at the ends)
and sum to 1, i.e. Captum's values times n/(n-1).
"""

from __future__ import annotations

import numpy as np
import torch

from circuitlab.errors import AttributionError

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def check_rule(rule: str, steps: int) -> None:
    """An `AttributionError` naming the choices for an unknown rule, or too few (or non-integer) steps."""
    if rule not in RULES:
        raise AttributionError(f"unknown integration rule {rule!r}; choose one of {', '.join(RULES)}")
    minimum = 2 if rule == "riemann_trapezoid" else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise AttributionError(f"the {rule} rule needs steps >= {minimum} (an integer), got {steps!r}")


def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas [steps], weights [steps]) with sum_k weights[k] g(alphas[k]) ~ integral_0^1 g."""
    check_rule(rule, steps)
    n = steps
    if rule == "gausslegendre":
        nodes, gauss_weights = np.polynomial.legendre.leggauss(n)
        return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * gauss_weights)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann_left":
        return torch.linspace(0, 1 - 1 / n, n, dtype=torch.float64), weights
    if rule == "riemann_right":
        return torch.linspace(1 / n, 1, n, dtype=torch.float64), weights
    if rule == "riemann_middle":
        return torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n, dtype=torch.float64), weights
    weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
    weights[0] /= 2
    weights[-1] /= 2
    return torch.linspace(0, 1, n, dtype=torch.float64), weights
