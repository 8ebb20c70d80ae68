"""Attention rollout and flow against hand computations on 2-position graphs."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.attention_flow import (
    attention_flow,
    attention_rollout,
    flow_graph,
    residual_attention,
)
from circuitlab.errors import AttributionError

from .toys import EPS32, EPS64

# Hand values are exact binary fractions; the float32 code adds/multiplies a handful of numbers <= 1, so
# each entry is within a few float32 ulps (eps32 at magnitude <= 1); flow runs on float64 capacities.
HAND32 = 8 * EPS32
HAND64 = 16 * EPS64


def test_rollout_matches_hand_computation():
    a1 = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    a2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    patterns = torch.stack([torch.stack([a1, a1]), torch.stack([a2, a2])])  # [layer, head, q, k]
    # A~1 = 0.5 a1 + 0.5 I = [[1, 0], [0.125, 0.875]]; A~2 = [[1, 0], [0.25, 0.75]]
    hand = torch.tensor([[1.0, 0.0], [0.25 + 0.75 * 0.125, 0.75 * 0.875]])
    rollout = attention_rollout(patterns)
    assert torch.allclose(rollout[0], torch.tensor([[1.0, 0.0], [0.125, 0.875]]), rtol=0, atol=HAND32)
    assert torch.allclose(rollout[1], hand, rtol=0, atol=HAND32)
    assert torch.allclose(rollout[1].sum(-1), torch.ones(2), rtol=0, atol=HAND32)


def test_rollout_renormalises_rows_and_averages_heads():
    patterns = torch.tensor([[[[2.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 3.0]]]])  # 1 layer, 2 heads
    mixed = residual_attention(patterns)[0]
    mean = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    expected = 0.5 * mean + 0.5 * torch.eye(2)
    assert torch.allclose(mixed, expected / expected.sum(-1, keepdim=True), rtol=0, atol=HAND32)


def test_max_flow_on_tiny_graph():
    # One layer, residual 0: A~ = A. Input 0 reaches output 1 directly (0.3) only; input 1 with 0.7.
    patterns = torch.tensor([[[[1.0, 0.0], [0.3, 0.7]]]], dtype=torch.float64)
    flow = attention_flow(patterns, target=1, residual=0.0)
    assert flow[0].tolist() == pytest.approx([0.3, 0.7], rel=0, abs=HAND64)
    # Two layers, both [[1, 0], [0.5, 0.5]]: input 0 -> (2, 1) via (1, 0) [cap 1 then 0.5] and via (1, 1)
    # [0.5 then 0.5]: max flow = min(1, 0.5) + min(0.5, 0.5) = 1.0; input 1 -> only via (1, 1): 0.5.
    layer = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    two = torch.stack([layer[None], layer[None]])
    flow2 = attention_flow(two, target=1, residual=0.0)
    assert flow2[1].tolist() == pytest.approx([1.0, 0.5], rel=0, abs=HAND64)
    assert flow_graph(residual_attention(two, 0.0)).number_of_edges() == 6


def test_flow_bad_input():
    with pytest.raises(AttributionError, match="q == k"):
        attention_rollout(torch.zeros(2, 2, 3, 4))
    with pytest.raises(AttributionError, match="residual"):
        attention_rollout(torch.ones(1, 1, 2, 2) / 2, residual=2.0)
    with pytest.raises(AttributionError, match="out of range"):
        attention_flow(torch.ones(1, 1, 2, 2) / 2, layers=[3])
