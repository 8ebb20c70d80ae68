"""ACDC on the real SmolLM2-135M at a tiny budget: the first receivers in ACDC's order (the logits and the
last MLP), one IOI prompt. The carried current metric equals a full (not restarted) masked run of the
circuit ACDC left."""

from __future__ import annotations

import pytest
import torch

from circuitlab.discovery.acdc import acdc, search_order
from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import BatchInputs
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.tasks.task import Example, Task

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("level", ["edge", "head"])
def test_acdc_first_receivers_on_smollm(smollm, level):
    """At head level the third receiver is the head a29.h8 whole (its q, k and v inputs as one)."""
    task = Task("ioi1", [Example("When Mary and John went to the store, John gave a drink to",
                                 "When Mary and John went to the store, Paul gave a drink to", [" Mary"], [" John"])])
    found = acdc(smollm, task, tau=0.005, receivers=2 if level == "edge" else 3, level=level)
    graph = found.graph
    assert [s.receiver for s in found.steps] == ["logits", "m29", "a29.h8"][:len(found.steps)]
    if level == "head":  # a sender's q, k and v edges into a29.h8: all kept or all removed
        for candidate in search_order(graph, "head").candidates[2]:
            assert len(candidate) == 3 and len(set(found.in_graph[candidate].tolist())) == 1
    into = torch.isin(graph.edge_dst, torch.tensor([graph.receiver_index["logits"], graph.receiver_index["m29"]]))
    assert bool(found.tested[into].all())
    if level == "edge":
        assert not bool(found.tested[~into].any())
    assert 0 < int((~found.in_graph[into]).sum()) < int(into.sum())  # some edges removed, some kept
    assert found.n_forwards < int(into.sum())  # batched: fewer forwards than tested edges
    # The circuit's KL, recomputed with one full masked forward, equals the metric ACDC carried.
    prepared = task.prepare(smollm)
    engine = MaskedEdgeEngine(smollm, graph)
    scorer = discovery_metric(prepared, "kl")
    inputs = BatchInputs.build(engine, prepared.batches[0], "corrupt", scorer)
    with torch.no_grad():
        logits = engine.run(inputs.tokens, found.in_graph.float(), inputs.ablated)
    value = float(scorer(logits, inputs.batch, inputs.reference).mean())
    # KL of float32 logits regrouped by the restart: within a few eps x the KL's terms (order max|logit|).
    scale = float(inputs.reference.abs().max())
    assert abs(value - found.final_metric) <= 64 * EPS * scale, (value, found.final_metric)
