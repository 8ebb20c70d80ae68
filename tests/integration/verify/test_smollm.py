"""Verification on SmolLM2-135M: a top-200 EAP circuit on two IOI prompts; finite, consistent numbers.

Kept tiny (two prompts of one template, a handful of masked runs): each masked run of SmolLM2's 123,211
edges is a full forward per circuit.
"""

from __future__ import annotations

import math

import pytest
import torch

from circuitlab.discovery.scores import edge_scores
from circuitlab.graph.circuit import Circuit
from circuitlab.tasks.registry import make_task
from circuitlab.verify.measures import Verifier

F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def setup(smollm):
    task = make_task("ioi", smollm, n=2, templates=[0]).prepare(smollm)
    scoring = edge_scores(smollm, task, method="eap")
    circuit = Circuit.top_n(scoring.graph, scoring.scores, 200, model=smollm)
    return Verifier(smollm, task, circuit.graph, n_bootstrap=100), circuit


def test_verify_on_smollm_is_finite_and_consistent(setup):
    verifier, circuit = setup
    full = verifier.full_mask
    f_full, f_empty, f_circuit = verifier.faithfulness(torch.stack([full, ~full, circuit.in_graph]))
    assert f_full.value == pytest.approx(1.0, abs=64 * F32) and f_empty.value == pytest.approx(0.0, abs=64 * F32)
    for interval in (f_circuit, f_full):
        assert all(math.isfinite(x) for x in (interval.value, interval.low, interval.high))
        assert interval.low - 1e-9 <= interval.value <= interval.high + 1e-9
    same = verifier.consistency(full, tolerance=0.0)
    assert float(same.kl.max()) == 0.0 and bool((same.top1_agree == 1).all())
    result = verifier.consistency(circuit.in_graph, tolerance=0.1)
    assert torch.isfinite(result.kl).all() and bool((result.kl >= 0).all())
    assert torch.isfinite(result.max_abs_diff).all()
    curve = verifier.perturbation(circuit.in_graph, (0.0, 0.1))
    assert curve.model[0].value == 0.0 and curve.circuit[0].value == 0.0
    assert math.isfinite(curve.model[1].value) and curve.model[1].value > 0
    search = verifier.completeness(circuit.in_graph, subsets=1, greedy_steps=0)
    assert math.isfinite(search.worst.value) and search.worst.value >= 0
