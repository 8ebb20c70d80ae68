"""Attention x gradient against a float64 central difference on a toy model."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.attention_gradient import attention_times_gradient
from circuitlab.models.hooks import hook_name

from .toys import EPS64, prepared, toy64

# Central difference in float64 (`toy64`): error = truncation h^2 |m'''| / 6 + rounding ~ eps64 |m| / h.
# With h = 1e-4 and |m|, |m'''| = O(1) on this toy: ~2e-9 + ~1e-12 (measured: ~1e-10 relative). The
# analytic side is float64 autograd (rounding ~1e-15 relative). REL = 1e-6 is 500x the truncation bound
# and still fails on any real bug (a wrong score is off by O(1)); ABS covers a score that is ~0.
H = 1e-4
REL, ABS = 1e-6, 1e6 * EPS64


@pytest.fixture(scope="module")
def model():
    return toy64(n_layers=2, seed=0)


@pytest.mark.parametrize(("layer", "head"), [(0, 2), (1, 1)])
def test_attention_gradient_matches_finite_difference(model, layer, head):
    """Scaling head h's pattern by (1 + t) changes the metric at rate sum_{q,k} A dm/dA (its score)."""
    p = prepared(model)
    batch = p.single_batch()
    scores = attention_times_gradient(model, batch, p.metric).scores  # [batch, layer, head, q, k]
    assert scores.dtype == torch.float64

    def metric_with_scale(t: float) -> torch.Tensor:
        def scale(act, hook=None):
            act = act.clone()
            act[:, head] = act[:, head] * (1 + t)
            return act

        with torch.no_grad():
            logits = model.bridge.run_with_hooks(batch.clean, fwd_hooks=[(hook_name("pattern", layer), scale)])
        return p.metric(logits, batch)

    numeric = (metric_with_scale(H) - metric_with_scale(-H)) / (2 * H)
    analytic = scores[:, layer, head].sum((-1, -2))
    assert float(analytic.abs().max()) > 1e3 * ABS  # the check has something to see
    torch.testing.assert_close(numeric, analytic, rtol=REL, atol=ABS)
