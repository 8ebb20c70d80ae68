"""From scores to circuits: top-n, threshold, greedy from the logits, and their bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from circuitlab.discovery.selection import (
    check_target,
    greedy_mask,
    nested_masks,
    select,
    threshold_mask,
    top_n_mask,
)
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph, GraphShape


@pytest.fixture(scope="module")
def graph():
    return Graph(GraphShape(n_layers=2, n_heads=3))


@pytest.fixture(scope="module")
def scores(graph):
    return torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))


def test_top_n_keeps_the_largest_absolute_scores(graph, scores):
    mask = top_n_mask(scores, 7)
    assert int(mask.sum()) == 7
    assert float(scores[mask].abs().min()) >= float(scores[~mask].abs().max())
    signed = top_n_mask(scores, 7, absolute=False)
    assert float(scores[signed].min()) >= float(scores[~signed].max())
    assert int(top_n_mask(scores, 0).sum()) == 0 and bool(top_n_mask(scores, graph.n_edges).all())


def test_nested_masks_match_top_n(scores):
    sizes = [0, 1, 5, 20, scores.numel()]
    masks = nested_masks(scores, sizes)
    for size, mask in zip(sizes, masks, strict=True):
        assert torch.equal(mask, top_n_mask(scores, size))


def test_threshold_is_inclusive_and_skips_nan(scores):
    cut = float(scores.abs().sort().values[-5])  # the 5th largest |score|
    assert int(threshold_mask(scores, cut).sum()) == 5
    assert bool(threshold_mask(scores, 0.0).all())
    with_nan = scores.clone()
    with_nan[0] = math.nan
    assert not bool(threshold_mask(with_nan, 0.0)[0])


def test_greedy_circuit_has_no_dangling_edges(graph, scores):
    for n in (1, 5, 12, 40):
        mask = greedy_mask(graph, scores, n)
        circuit = Circuit(graph, mask)
        assert circuit.n_edges <= n  # fewer when edges whose sender the input does not reach are pruned
        assert torch.equal(circuit.pruned().in_graph, mask)  # pruning removes nothing: no dangling edge
    assert Circuit(graph, greedy_mask(graph, scores, 40)).n_edges > 0
    first = greedy_mask(graph, scores, 1, prune=False)
    logits_edges = torch.tensor([graph.receivers[int(d)] == "logits" for d in graph.edge_dst])
    best_into_logits = int(torch.where(logits_edges, scores.abs(), -1.0).argmax())
    assert torch.nonzero(first).flatten().tolist() == [best_into_logits]  # starts from the logits
    assert bool(greedy_mask(graph, scores, graph.n_edges).all())


def test_select_and_bad_inputs(graph, scores):
    circuit = select(graph, scores, top_n=4)
    assert circuit.n_edges == 4 and circuit.scores is not None
    with pytest.raises(DiscoveryError, match="exactly one"):
        select(graph, scores, top_n=4, threshold=0.1)
    with pytest.raises(DiscoveryError, match="threshold must be a number >= 0"):
        select(graph, scores, threshold=-0.1)
    with pytest.raises(DiscoveryError, match=f"larger than the graph, which has {graph.n_edges} edges"):
        select(graph, scores, top_n=graph.n_edges + 1)
    with pytest.raises(DiscoveryError, match="non-negative integer"):
        select(graph, scores, top_n=-1)
    for bad in (0.0, 1.5, -0.2, math.nan):
        with pytest.raises(DiscoveryError, match=r"must lie in \(0, 1\]"):
            check_target(bad)
    assert check_target(1.0) == 1.0
