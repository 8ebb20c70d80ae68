"""Exact edge effects on the real SmolLM2-135M: restarted at each edge's receiver layer, they equal one full
masked run per edge."""

from __future__ import annotations

import torch

from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import BatchInputs, exact_sums
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.tasks.task import Example, Task

EPS = torch.finfo(torch.float32).eps


def test_exact_effects_equal_full_masked_runs(smollm):
    task = Task("ioi1", [Example("When Mary and John went to the store, John gave a drink to",
                                 "When Mary and John went to the store, Paul gave a drink to", [" Mary"], [" John"])])
    prepared = task.prepare(smollm)
    engine = MaskedEdgeEngine(smollm)
    scorer = discovery_metric(prepared)
    batch = prepared.batches[0]
    inputs = BatchInputs.build(engine, batch, "corrupt", scorer)
    names = ["a0.h1->a3.h0<q>", "m10->a21.h4<v>", "a25.h2->m29", "m29->logits", "a23.h3->logits"]
    edges = engine.graph.edge_ids(names)
    sums, full = exact_sums(engine, inputs, scorer, edges=edges, chunk=2)
    rows = torch.ones(len(names) + 1, engine.graph.n_edges)
    rows[torch.arange(len(names)), edges] = 0.0
    with torch.no_grad():
        values = [float(scorer(engine.run(batch.clean, row, inputs.ablated), batch).sum()) for row in rows]
    want = torch.tensor(values[:-1]) - values[-1]
    # Metric differences of float32 logits: the logits agree to 64 eps x max|logit| (masked-run tolerance),
    # and a logit difference moves by at most twice that.
    with torch.no_grad():
        scale = float(smollm.bridge(batch.clean).abs().max())
    bound = 4 * 64 * EPS * scale
    assert (sums[edges] - want).abs().max() <= bound, (sums[edges], want)
    assert abs(full - values[-1]) <= 2 * 64 * EPS * scale
    assert want.abs().max() > 10 * bound
