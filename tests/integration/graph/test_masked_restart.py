"""Restarted masked runs on the real SmolLM2-135M equal the full masked runs (issue 11: a coefficient set
that changes only edges into layers >= r starts at layer r from the recorded clean run)."""

from __future__ import annotations

import torch

from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.masked import MaskedEdgeEngine

CLEAN = ["When Mary and John went to the store, John gave a drink to"]
CORRUPT = ["When Mary and John went to the store, Paul gave a drink to"]
EPS = torch.finfo(torch.float32).eps


def tol(reference: torch.Tensor) -> float:
    """The same float32 sums grouped differently (recorded clean differences vs this run's): measured
    <= 8 eps * max|logit| for masked runs on SmolLM2's 30 layers, so 64 eps leaves an 8x margin."""
    return 64 * EPS * float(reference.detach().abs().max())


def test_restarted_runs_equal_full_runs(smollm):
    engine = MaskedEdgeEngine(smollm)
    assert engine.restart_error is None
    clean, corrupt = smollm.to_tokens(CLEAN), smollm.to_tokens(CORRUPT)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for start in (20, 29, 30):  # late heads and MLPs, the last layer, the logits only
        row = torch.rand(engine.graph.n_edges, generator=gen)
        row[engine.edge_layer < start] = 1.0
        rows.append(row)
    coefficients = torch.stack(rows)
    record = engine.record(clean)
    with torch.no_grad():
        full = engine.run(clean, coefficients, ablated)
        restarted = engine.run(clean, coefficients, ablated, record=record, max_batch=1)
        plain = smollm.bridge(clean)
    for got, want in zip(restarted, full, strict=True):
        assert (got - want).abs().max() < tol(want)
        assert (want - plain).abs().max() > 10 * tol(plain)
