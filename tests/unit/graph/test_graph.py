"""Edge graph: counts, EAP-IG naming and order, MIB JSON layout, and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlab.errors import CircuitlabError, GraphError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph, GraphShape, count_edges
from circuitlab.graph.mib_json import from_mib_dict, to_mib_dict
from circuitlab.graph.naming import match_names, parse_node


def eap_ig_edges(n_layers: int, n_heads: int) -> list[str]:
    """Independent re-statement of EAP-IG's Graph.from_model loop (sequential blocks)."""
    edges, stream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        edges += [f"{s}->{h}<{x}>" for s in stream for h in heads for x in "qkv"]
        stream += heads
        edges += [f"{s}->m{layer}" for s in stream]
        stream.append(f"m{layer}")
    return edges + [f"{s}->logits" for s in stream]


def test_edge_counts_from_shapes():
    # GPT-2 small (12 x 12, MLPs) and SmolLM2-135M (30 x 9, ungrouped GQA): the MIB numbers.
    assert Graph(GraphShape(12, 12)).n_edges == count_edges(12, 12) == 32491
    assert Graph(GraphShape(30, 9, n_key_value_heads=3)).n_edges == count_edges(30, 9) == 123211
    for L, H, attn_only in [(1, 1, False), (2, 3, True), (4, 2, False)]:
        graph = Graph(GraphShape(L, H, attn_only))
        assert graph.n_edges == count_edges(L, H, attn_only) == len(set(graph.edges))


def test_edge_names_and_order_match_eap_ig():
    graph = Graph(GraphShape(3, 2))
    assert graph.edges == eap_ig_edges(3, 2)
    assert graph.nodes == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "a2.h0", "a2.h1", "m2", "logits"]
    for e, name in enumerate(graph.edges):
        sender, receiver = name.split("->")
        assert graph.senders[int(graph.edge_src[e])] == sender and graph.receivers[int(graph.edge_dst[e])] == receiver


def test_attention_only_graph_has_no_mlp_nodes():
    graph = Graph(GraphShape(2, 2, attn_only=True))
    assert not any(n.startswith("m") for n in graph.nodes)
    assert "a0.h1->a1.h0<v>" in graph.edge_index and "a0.h0->logits" in graph.edge_index


def test_graph_from_toy_model(toy):
    graph = Graph.from_model(toy)
    assert graph.shape == GraphShape(2, 4, False, None, 32)


@pytest.mark.parametrize("name, fragment", [
    ("a1.h0->a0.h1<q>", "runs backwards"),
    ("a0.h0->a0.h1<q>", "runs backwards"),
    ("m0->m0", "runs backwards"),
    ("a0.h0->a1.h0", "<q>"),
    ("input->m0<q>", "no <q/k/v> suffix"),
    ("a9.h0->logits", "not in this graph"),
    ("x3->logits", "not a node name"),
    ("a0.h0-logits", "not an edge name"),
    ("logits->m1", "cannot send"),
])
def test_bad_edge_names_raise_graph_error(name, fragment):
    graph = Graph(GraphShape(2, 2))
    with pytest.raises(GraphError, match=fragment):
        graph.edge_id(name)


def test_coefficient_shape_and_range_errors():
    graph = Graph(GraphShape(2, 2))
    assert graph.check_coefficients(torch.ones(graph.n_edges)).shape == (1, graph.n_edges)
    for bad in (torch.ones(graph.n_edges - 1), torch.ones(2, 3, graph.n_edges), torch.full((graph.n_edges,), 1.5)):
        with pytest.raises(GraphError):
            graph.check_coefficients(bad)
    assert issubclass(GraphError, CircuitlabError)


def test_patterns():
    graph = Graph(GraphShape(3, 2))
    assert match_names("a1.h*", graph.senders, "node") == ["a1.h0", "a1.h1"]
    assert match_names("m*, input", graph.senders, "node") == ["input", "m0", "m1", "m2"]
    with pytest.raises(GraphError, match="matches no"):
        match_names("a7.h*", graph.senders, "node")
    assert parse_node("a12.h3").layer == 12


def test_json_round_trip(tmp_path):
    graph = Graph(GraphShape(2, 3, n_key_value_heads=1, d_model=16))
    scores = torch.randn(graph.n_edges)
    circuit = Circuit.top_n(graph, scores, 25)
    path = circuit.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert set(data) == {"cfg", "nodes", "edges"}
    assert list(data["edges"]) == graph.edges
    assert data["edges"][graph.edges[0]].keys() == {"score", "in_graph"}
    assert data["cfg"]["n_layers"] == 2 and data["cfg"]["n_heads"] == 3 and data["cfg"]["parallel_attn_mlp"] is False
    loaded = Circuit.load(path)
    assert torch.equal(loaded.in_graph, circuit.in_graph)
    # float32 -> Python float -> JSON repr -> float32 is exact: no tolerance
    assert torch.equal(loaded.scores, scores)
    assert sorted(n for n, v in data["nodes"].items() if v["in_graph"] and n != "logits") == sorted(
        n for n in circuit.nodes if n != "logits")


def test_hand_written_mib_file(tmp_path):
    # As EAP-IG's to_json writes it (only some edges listed; node scores present), for a 1-layer 2-head model.
    text = """{"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": false, "d_model": 8},
      "nodes": {"input": {"in_graph": true, "score": 0.5}, "a0.h0": {"in_graph": true, "score": 1.0},
                "a0.h1": {"in_graph": false, "score": 0.0}, "m0": {"in_graph": true, "score": 0.2},
                "logits": {"in_graph": true, "score": 0.0}},
      "edges": {"input->a0.h0<q>": {"score": 0.9, "in_graph": true},
                "a0.h0->m0": {"score": -0.4, "in_graph": true},
                "m0->logits": {"score": 0.3, "in_graph": true},
                "a0.h1->logits": {"score": 0.01, "in_graph": false}}}"""
    path = tmp_path / "mib.json"
    path.write_text(text)
    circuit = Circuit.load(path)
    assert circuit.edges == ["input->a0.h0<q>", "a0.h0->m0", "m0->logits"]
    assert circuit.nodes == ["input", "a0.h0", "m0", "logits"]
    # stored as float32: within half an ulp of -0.4
    assert circuit.scores[circuit.graph.edge_id("a0.h0->m0")] == pytest.approx(-0.4, rel=torch.finfo(torch.float32).eps)
    assert circuit.node_scores["a0.h0"] == 1.0
    assert circuit.pruned().edges == circuit.edges


def test_bad_files_raise_graph_error(tmp_path, toy):
    graph = Graph(GraphShape(1, 2))
    data = to_mib_dict(graph, torch.zeros(graph.n_edges, dtype=torch.bool))
    data["edges"]["a0.h0->a0.h1<q>"] = {"score": 0.0, "in_graph": True}
    with pytest.raises(GraphError, match="runs backwards"):
        from_mib_dict(data)
    with pytest.raises(GraphError, match="expected keys"):
        from_mib_dict({"edges": {}})
    path = Circuit.full(Graph(GraphShape(3, 4, d_model=32))).save(tmp_path / "other.json")
    with pytest.raises(GraphError, match="made for a model with 3 layers"):
        Circuit.load(path, model=toy)
