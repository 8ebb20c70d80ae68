"""Node-level circuits (discovery/nodes.py): the edges a node set keeps, and how a large circuit is drawn."""

import pytest
import torch

from circuitlab.discovery.nodes import node_mask
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.draw import drawn_subset
from circuitlab.graph.graph import Graph


def test_node_mask_keeps_edges_among_the_nodes_and_to_the_logits(toy):
    graph = Graph.from_model(toy)
    mask = node_mask(graph, ["a0.h1", "m1"])
    edges = {graph.edges[e] for e in mask.nonzero().flatten().tolist()}
    assert {"input->a0.h1<q>", "a0.h1->m1", "m1->logits", "a0.h1->logits", "input->logits"} <= edges
    allowed = {"input", "a0.h1", "m1", "logits"}
    assert all(e.split("->")[0] in allowed and e.split("->")[1].split("<")[0] in allowed for e in edges)
    with pytest.raises(Exception, match="not in this graph"):
        node_mask(graph, ["a7.h0"])


def test_drawn_subset_keeps_the_highest_priority_edges_of_the_circuit(toy):
    graph = Graph.from_model(toy)
    in_graph = torch.zeros(graph.n_edges, dtype=torch.bool)
    in_graph[:10] = True
    circuit = Circuit(graph, in_graph)
    assert drawn_subset(circuit, torch.zeros(graph.n_edges), limit=10) == (circuit, "")
    priority = torch.arange(graph.n_edges, dtype=torch.float32)  # edges outside the circuit rank highest
    drawn, note = drawn_subset(circuit, priority, limit=3)
    assert drawn.in_graph.nonzero().flatten().tolist() == [7, 8, 9]
    assert note == " (3 of 10 edges drawn)"
