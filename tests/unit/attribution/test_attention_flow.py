"""Attention rollout and flow against hand computations on 2-position graphs."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.attention_flow import (
    attention_flow,
    attention_rollout,
    flow_graph,
    normalised_flow,
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


# Three positions, position 0 the BOS sink; one layer, two heads (exact binary fractions).
SINK = torch.tensor([[
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.25, 0.25]],
    [[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.75, 0.125, 0.125]],
]])


def test_excluding_bos_drops_it_and_renormalises_rows():
    # mean over heads: row 1 = [0.625, 0.375, 0], row 2 = [0.625, 0.1875, 0.1875]. Without BOS (rows and
    # columns 1..2): [0.375, 0] -> [1, 0]; [0.1875, 0.1875] -> [0.5, 0.5]. Residual mix 0.5/0.5:
    # [[1, 0], [0.25, 0.75]].
    mixed = residual_attention(SINK, exclude_bos=True)[0]
    assert torch.allclose(mixed, torch.tensor([[1.0, 0.0], [0.25, 0.75]]), rtol=0, atol=HAND32)
    rollout = attention_rollout(SINK, exclude_bos=True)
    assert rollout.shape == (1, 2, 2) and torch.allclose(rollout[0], mixed, rtol=0, atol=HAND32)
    # With BOS: row 2 = 0.5 [0.625, 0.1875, 0.1875] + 0.5 [0, 0, 1] = [0.3125, 0.09375, 0.59375].
    kept = attention_rollout(SINK)[0, 2]
    assert torch.allclose(kept, torch.tensor([0.3125, 0.09375, 0.59375]), rtol=0, atol=HAND32)
    # A row whose only non-BOS weight is zero keeps itself (no division by zero).
    sink_only = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert residual_attention(sink_only, exclude_bos=True)[0].tolist() == [[1.0]]


def test_flow_excluding_bos_and_normalised():
    # Two layers over three positions, the same head twice. Without BOS each layer's mixed matrix on
    # positions 1..2 is M = [[1, 0], [0.25, 0.75]] (as above). Into (2, pos 2): source pos 1 reaches it via
    # (1, pos 1) [M11 = 1, then M21 = 0.25] and via (1, pos 2) [M21 = 0.25, then M22 = 0.75]:
    # min(1, 0.25) + min(0.25, 0.75) = 0.5; source pos 2 only via (1, pos 2): min(0.75, 0.75) = 0.75.
    two = torch.cat([SINK, SINK]).double()
    raw = attention_flow(two, target=2, exclude_bos=True)
    assert raw[1].tolist() == pytest.approx([0.5, 0.75], rel=0, abs=HAND64)
    assert raw[0].tolist() == pytest.approx([0.25, 0.75], rel=0, abs=HAND64)  # one layer: the edges themselves
    # compute_flows: each row divided by its sum.
    assert normalised_flow(raw)[1].tolist() == pytest.approx([0.4, 0.6], rel=0, abs=HAND64)
    with pytest.raises(AttributionError, match="target position is BOS"):
        attention_flow(two, target=0, exclude_bos=True)


def test_flow_bad_input():
    with pytest.raises(AttributionError, match="q == k"):
        attention_rollout(torch.zeros(2, 2, 3, 4))
    with pytest.raises(AttributionError, match="residual"):
        attention_rollout(torch.ones(1, 1, 2, 2) / 2, residual=2.0)
    with pytest.raises(AttributionError, match="out of range"):
        attention_flow(torch.ones(1, 1, 2, 2) / 2, layers=[3])
