"""Edge graph on the real SmolLM2-135M: edge count, masked-run identities, path patching agreement."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph import Graph
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_patch, path_patch_classic

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Anna gave a book to"]
CORRUPT = ["When Mary and John went to the store, Paul gave a drink to",
           "When Tom and Anna went to the park, Kate gave a book to"]


@pytest.fixture(scope="module")
def setup(smollm):
    clean, corrupt = smollm.to_tokens(CLEAN), smollm.to_tokens(CORRUPT)
    engine = MaskedEdgeEngine(smollm)
    return smollm, engine, clean, corrupt


def test_edge_count(smollm):
    graph = Graph.from_model(smollm)
    assert graph.n_edges == 123211 and graph.shape.n_key_value_heads == 3


def test_identities(setup):
    model, engine, clean, corrupt = setup
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    n = engine.graph.n_edges
    with torch.no_grad():
        both = engine.run(clean, torch.stack([torch.ones(n), torch.zeros(n)]), ablated)
        assert (both[0] - model.bridge(clean)).abs().max() < 1e-4
        assert (both[1] - model.bridge(corrupt)).abs().max() < 1e-4


def test_masked_and_classic_path_patching_agree(setup):
    model, engine, clean, corrupt = setup
    for senders, receivers in [("a3.h*", "a9.h*<q>"), ("a20.h4,m12", "logits")]:
        masked = path_patch(engine, senders, receivers, clean, corrupt)
        classic = path_patch_classic(model, senders, receivers, clean, corrupt, graph=engine.graph)
        assert (masked - classic)[:, -1].abs().max() < 1e-3
        assert (masked - model.bridge(clean))[:, -1].abs().max() > 1e-3
    with pytest.raises(GraphError, match="GQA"):
        path_patch_classic(model, "a3.h0", "a9.h1<k>", clean, corrupt)


def test_circuit_file_round_trip(setup, tmp_path):
    model, engine, _, _ = setup
    scores = torch.randn(engine.graph.n_edges, generator=torch.Generator().manual_seed(0))
    circuit = Circuit.top_n(engine.graph, scores, 500, model=model)
    loaded = Circuit.load(circuit.save(tmp_path / "smollm.json"), model=model)
    assert torch.equal(loaded.in_graph, circuit.in_graph) and loaded.model is model
