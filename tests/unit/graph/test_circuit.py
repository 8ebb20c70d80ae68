"""Circuit: runs (full = clean, empty = corrupt), pruning, set operations, overlap, drawing."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph, GraphShape


def tol(reference: torch.Tensor) -> float:
    """A masked run reorders float32 sums of sender outputs: measured <= 8 eps * max|logit| on the toy
    models and SmolLM2; 64 eps leaves an 8x margin, far below the clean/corrupt difference."""
    return 64 * torch.finfo(torch.float32).eps * float(reference.detach().abs().max())


def test_full_and_empty_circuit_runs(toy):
    graph = Graph.from_model(toy)
    clean = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12]])
    corrupt = torch.tensor([[0, 13, 14, 15, 16], [0, 17, 18, 19, 20]])
    with torch.no_grad():
        want_clean, want_corrupt = toy.bridge(clean), toy.bridge(corrupt)
        assert (Circuit.full(graph, toy).run(clean, corrupt=corrupt) - want_clean).abs().max() < tol(want_clean)
        assert (Circuit.empty(graph, toy).run(clean, corrupt=corrupt) - want_corrupt).abs().max() < tol(want_corrupt)
    with pytest.raises(GraphError, match="no model"):
        Circuit.full(graph).run(clean, corrupt=corrupt)


def test_pruning_removes_dangling_edges():
    graph = Graph(GraphShape(3, 2))
    path = ["input->a0.h0<q>", "a0.h0->m1", "m1->logits"]
    dangling = ["a0.h1->a1.h0<k>", "a2.h0->logits", "input->m0"]  # a0.h1 has no input; a1.h0, m0 reach nothing
    circuit = Circuit.from_edges(graph, path + dangling)
    assert circuit.pruned().edges == path
    assert "a0.h0->m1" in circuit and "a0.h0->m2" not in circuit


def test_set_operations_and_overlap():
    graph = Graph(GraphShape(2, 2))
    a = Circuit.from_edges(graph, ["input->a0.h0<q>", "a0.h0->logits", "input->logits"])
    b = Circuit.from_edges(graph, ["input->a0.h0<q>", "a0.h0->logits", "m1->logits"])
    assert (a | b).n_edges == 4 and (a & b).n_edges == 2 and (a - b).edges == ["input->logits"]
    overlap = a.overlap(b)
    assert overlap["edge_jaccard"] == pytest.approx(2 / 4)
    assert overlap["edge_precision"] == pytest.approx(2 / 3) and overlap["edge_recall"] == pytest.approx(2 / 3)
    assert overlap["node_jaccard"] == pytest.approx(3 / 4)  # {input, a0.h0, logits} vs {.., m1}
    stats = a.stats()
    assert stats["n_edges"] == 3 and stats["edges_into_q"] == 1 and stats["edges_into_logits"] == 2
    with pytest.raises(GraphError, match="different graphs"):
        a | Circuit.empty(Graph(GraphShape(3, 2)))


def test_top_n_keeps_the_largest_scores():
    graph = Graph(GraphShape(2, 2))
    scores = torch.zeros(graph.n_edges)
    scores[[3, 10, 20]] = torch.tensor([5.0, -7.0, 1.0])
    assert set(Circuit.top_n(graph, scores, 2).edges) == {graph.edges[3], graph.edges[10]}
    assert set(Circuit.top_n(graph, scores, 2, absolute=False).edges) == {graph.edges[3], graph.edges[20]}


def test_drawing_writes_png_svg_dot(tmp_path):
    graph = Graph(GraphShape(2, 3))
    scores = torch.linspace(-1, 1, graph.n_edges)
    circuit = Circuit.top_n(graph, scores, 30)
    paths = circuit.draw(tmp_path / "circuit")
    assert sorted(p.suffix for p in paths) == [".dot", ".png", ".svg"]
    dot = (tmp_path / "circuit.dot").read_text()
    assert dot.startswith("digraph") and dot.count("->") == 30
    assert (tmp_path / "circuit.png").read_bytes()[:4] == b"\x89PNG"
