"""Edge graph on the real SmolLM2-135M: edge count, masked-run identities, path patching agreement, and
the `path-patch` analysis over a task of two token lengths."""

from __future__ import annotations

import pytest
import torch
from conftest import masked_identity_logits

from circuitlab.errors import GraphError
from circuitlab.graph.analysis import PathPatchParams, path_patch_task
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_patch, path_patch_classic
from circuitlab.tasks.task import Example, Task

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Anna went to the park, Anna gave a book to"]
CORRUPT = ["When Mary and John went to the store, Paul gave a drink to",
           "When Tom and Anna went to the park, Kate gave a book to"]
EPS = torch.finfo(torch.float32).eps


def tol(reference: torch.Tensor) -> float:
    """Two float32 computations of the same logits in a different order (masked run vs bridge, masked vs
    classic): measured <= 8 eps * max|logit| on SmolLM2's 30 layers, so 64 eps leaves an 8x margin while
    every patch below moves the logits by > 10 tol (asserted)."""
    return 64 * EPS * float(reference.detach().abs().max())


@pytest.fixture(scope="module")
def setup(smollm):
    clean, corrupt = smollm.to_tokens(CLEAN), smollm.to_tokens(CORRUPT)
    engine = MaskedEdgeEngine(smollm)
    return smollm, engine, clean, corrupt


def test_edge_count(smollm):
    graph = Graph.from_model(smollm)
    assert graph.n_edges == 123211 and graph.shape.n_key_value_heads == 3


def test_identities(setup):
    _, engine, clean, corrupt = setup
    kept, ablated, want_clean, want_corrupt = masked_identity_logits(engine, clean, corrupt)
    assert (kept - want_clean).abs().max() < tol(want_clean)
    assert (ablated - want_corrupt).abs().max() < tol(want_corrupt)


def test_masked_and_classic_path_patching_agree(setup):
    model, engine, clean, corrupt = setup
    with torch.no_grad():
        plain = model.bridge(clean)[:, -1]
    for senders, receivers in [("a3.h*", "a9.h*<q>"), ("a20.h4,m12", "logits")]:
        masked = path_patch(engine, senders, receivers, clean, corrupt)[:, -1]
        classic = path_patch_classic(model, senders, receivers, clean, corrupt, graph=engine.graph)[:, -1]
        assert (masked - classic).abs().max() < tol(classic)
        assert (masked - plain).abs().max() > 10 * tol(classic)
    with pytest.raises(GraphError, match="GQA"):
        path_patch_classic(model, "a3.h0", "a9.h1<k>", clean, corrupt)


def test_path_patch_runs_every_length_group(smollm):
    """Issue 9: three prompts of two token lengths all count (none is dropped), and a receiver outside
    the model names the valid range."""
    examples = [Example(c, k, [" Mary" if "Mary" in c else " Tom"], [" John" if "Mary" in c else " Anna"])
                for c, k in zip(CLEAN, CORRUPT, strict=True)]
    examples.append(Example("When Mary and John went out, John gave a drink to",
                            "When Mary and John went out, Paul gave a drink to", [" Mary"], [" John"]))
    run = path_patch_task(smollm, Task("two-lengths", examples), PathPatchParams("a1.h*<q>"))
    assert run.n_prompts == 3 and len(run.token_lengths) == 2
    values = run.sweep.values
    assert not torch.isnan(values[0]).any() and torch.isnan(values[1:]).all()  # only layer 0 feeds a1
    assert len(run.records()) == 30 * 9 and run.summary()["strongest_sender"].startswith("a0.")
    with pytest.raises(GraphError, match=r"layers 0\.\.29, heads 0\.\.8"):
        path_patch_task(smollm, Task("one", examples[:1]), PathPatchParams("a30.h0<q>"))


def test_circuit_file_round_trip(setup, tmp_path):
    model, engine, _, _ = setup
    scores = torch.randn(engine.graph.n_edges, generator=torch.Generator().manual_seed(0))
    circuit = Circuit.top_n(engine.graph, scores, 500, model=model)
    loaded = Circuit.load(circuit.save(tmp_path / "smollm.json"), model=model)
    assert torch.equal(loaded.in_graph, circuit.in_graph) and loaded.model is model
