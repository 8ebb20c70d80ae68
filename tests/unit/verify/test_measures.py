"""Every verification measure on the hand-set induction model, whose true circuit is known (issue 14 §3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuitlab.errors import VerifyError
from circuitlab.graph.circuit import Circuit
from circuitlab.verify.bootstrap import Interval
from circuitlab.verify.measures import Verifier

# The metric means are float32 sums over a few prompts; ratios of them are exact to a few float32 ulps.
F32 = torch.finfo(torch.float32).eps
F64 = torch.finfo(torch.float64).eps


def covers(interval: Interval) -> bool:
    """The interval holds its point estimate (up to float64 rounding of the resampled means)."""
    slack = 64 * F64 * max(1.0, abs(interval.value))
    return interval.low - slack <= interval.value <= interval.high + slack


def masks(verifier: Verifier, *rows: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(rows))


def test_full_graph_has_faithfulness_one_and_kl_zero_empty_has_zero(verifier):
    full = verifier.full_mask
    f_full, f_empty = verifier.faithfulness(masks(verifier, full, ~full))
    assert f_full.value == pytest.approx(1.0, abs=16 * F32) and covers(f_full)
    assert f_empty.value == pytest.approx(0.0, abs=16 * F32) and covers(f_empty)
    same = verifier.consistency(full, tolerance=0.0)
    assert bool((same.top1_agree == 1).all())
    assert float(same.max_abs_diff.max()) == 0.0  # one engine, the same row twice: identical logits
    assert float(same.kl.max()) == 0.0


def test_true_circuit_is_faithful_and_every_true_edge_is_needed(handset, verifier):
    _, _, truth = handset
    (f,) = verifier.faithfulness(truth.in_graph.unsqueeze(0))
    assert f.value >= 0.95 and covers(f)
    rows = verifier.minimality(truth.in_graph, per_edge=True)
    edges = {r["component"]: r for r in rows if r["kind"] == "edge"}
    assert set(edges) == set(truth.edges)
    for name, row in edges.items():
        assert row["drop"] > 0.05, name  # removing any true edge lowers faithfulness
        assert covers(Interval(row["drop"], row["drop_ci_low"], row["drop_ci_high"]))
    assert {r["component"] for r in rows if r["kind"] == "node"} == {"a0.h1", "a1.h2"}


def test_consistency_of_the_true_circuit(handset, verifier):
    _, _, truth = handset
    result = verifier.consistency(truth.in_graph, tolerance=0.1)
    assert bool((result.top1_agree == 1).all())
    # the hand-set model's other heads are exactly zero: the circuit's logits are the model's to float32 rounding
    assert float(result.max_abs_diff.max()) < 1e3 * F32
    rows = result.records(["p"] * verifier.n_prompts)
    assert len(rows) == verifier.n_prompts and all(r["allclose"] for r in rows)


def test_a_useless_edge_is_flagged_non_minimal(handset, verifier):
    _, _, truth = handset
    extra = truth.in_graph.clone()
    useless = verifier.graph.edge_id("a0.h0->logits")  # a zero-weight head: its edge changes nothing
    extra[useless] = True
    rows = {r["component"]: r for r in verifier.minimality(extra, per_edge=True)}
    assert abs(rows["a0.h0->logits"]["drop"]) < 16 * F32 and abs(rows["a0.h0"]["drop"]) < 16 * F32
    assert rows["a1.h2->logits"]["drop"] > 0.5


def test_completeness_gap_is_zero_for_the_truth_and_positive_for_half_of_it(handset, verifier):
    _, _, truth = handset
    result = verifier.completeness(truth.in_graph, subsets=4, greedy_steps=2)
    assert result.worst.value < 16 * F32 and covers(result.worst)
    half = truth.in_graph & (verifier.graph.edge_dst != verifier.graph.edge_dst[verifier.graph.edge_id(
        "input->a1.h2<v>")])  # the induction head no longer reads the token it copies
    partial = verifier.completeness(half, subsets=4, greedy_steps=2)
    assert partial.worst.value > 0.5 and covers(partial.worst)
    assert partial.tried[0]["gap"] == partial.worst.value
    assert {r["source"] for r in partial.tried} >= {"empty", "random"}


def test_perturbation_is_exactly_zero_at_strength_zero_and_grows(handset, verifier):
    _, _, truth = handset
    result = verifier.perturbation(truth.in_graph, (0.0, 0.1, 0.5))
    assert result.model[0] == Interval(0.0, 0.0, 0.0) and result.circuit[0] == Interval(0.0, 0.0, 0.0)
    assert result.model[1].value < result.model[2].value
    assert all(covers(i) for i in [*result.model, *result.circuit, result.model_slope, result.circuit_slope])
    with pytest.raises(VerifyError, match="noise levels"):
        verifier.perturbation(truth.in_graph, (-0.1,))


def test_comparison_of_two_circuits(handset, verifier):
    _, _, truth = handset
    smaller = truth.in_graph.clone()
    smaller[verifier.graph.edge_id("a0.h1->a1.h2<k>")] = False
    result = verifier.compare(truth.in_graph, smaller)
    assert result["faithfulness"].value >= 0.95
    assert result["other_faithfulness"].value < result["faithfulness"].value
    # the smaller circuit lies inside the truth: truth & smaller = smaller, so it keeps all of its own behaviour
    assert result["inside_other"].value == pytest.approx(1.0, abs=16 * F32)
    assert result["other_inside"].value == pytest.approx(result["other_faithfulness"].value / result["faithfulness"].value,
                                                         rel=1e3 * F32)


def test_faithfulness_undefined_is_a_clear_error(handset):
    """Corrupt prompts equal to the clean ones: ablating changes nothing, f would be 0 / 0."""
    model, task, truth = handset
    same = dataclasses.replace(task, examples=[dataclasses.replace(ex, corrupt_ids=ex.clean_ids) for ex in task.examples])
    with pytest.raises(VerifyError, match="faithfulness is undefined"):
        Verifier(model, same, truth.graph, n_bootstrap=10)


def test_circuit_of_another_graph_is_rejected(handset):
    from circuitlab.graph.graph import Graph, GraphShape

    model, task, _ = handset
    other = Circuit.full(Graph(GraphShape(3, 2)))
    with pytest.raises(Exception, match="graph"):
        Verifier(model, task, other.graph, n_bootstrap=10)
