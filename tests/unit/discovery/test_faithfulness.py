"""Normalised faithfulness, its curve, CPR / CMD, and the smallest circuit reaching a target."""

from __future__ import annotations

import pytest
import torch

from circuitlab.discovery.faithfulness import (
    CircuitEvaluator,
    FaithfulnessCurve,
    faithfulness_curve,
    faithfulness_of,
    sizes_for,
    smallest_faithful_circuit,
)
from circuitlab.discovery.scores import edge_scores
from circuitlab.discovery.selection import top_n_mask
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def evaluator(toy, names_task):
    return CircuitEvaluator(toy, names_task)


@pytest.fixture(scope="module")
def scoring(toy, names_task):
    return edge_scores(toy, names_task, method="eap")


def test_full_circuit_is_one_and_empty_is_zero(evaluator, toy, names_task):
    graph = evaluator.graph
    assert faithfulness_of(evaluator, Circuit.full(graph)) == 1.0
    assert faithfulness_of(evaluator, Circuit.empty(graph)) == 0.0
    # The two ends are the model itself and the corrupt run (corrupt ablation of every edge): check them
    # against plain forwards, to float32 rounding of the reordered sums (64 eps x max|metric|).
    prepared = names_task.prepare(toy)
    with torch.no_grad():
        clean = sum(float(prepared.metric(toy.bridge(b.clean), b).sum()) for b in prepared.batches)
        corrupt = sum(float(prepared.metric(toy.bridge(b.corrupt), b).sum()) for b in prepared.batches)
    scale = 64 * EPS * max(1.0, abs(clean), abs(corrupt))
    assert abs(evaluator.full - clean / prepared.n_prompts) <= scale
    assert abs(evaluator.empty - corrupt / prepared.n_prompts) <= scale


def test_cpr_and_cmd_on_known_curves():
    step = FaithfulnessCurve([0, 5, 10], [0.0, 0.5, 1.0], [0.0, 1.0, 1.0], [0, 0, 0], 1.0, 0.0, "m")
    assert step.cpr == pytest.approx(0.75, abs=EPS) and step.cmd == pytest.approx(0.25, abs=EPS)
    line = FaithfulnessCurve([0, 10], [0.0, 1.0], [0.0, 1.0], [0, 0], 1.0, 0.0, "m")
    assert line.cpr == pytest.approx(0.5, abs=EPS) and line.cmd == pytest.approx(0.5, abs=EPS)
    overshoot = FaithfulnessCurve([0, 5, 10], [0.0, 0.5, 1.0], [0.0, 2.0, 1.0], [0, 0, 0], 1.0, 0.0, "m")
    assert overshoot.cpr == pytest.approx(1.25, abs=EPS) and overshoot.cmd == pytest.approx(0.75, abs=EPS)
    assert "CPR 0.750" in step.figure().axes[0].get_title()


def test_curve_over_mib_sizes(evaluator, scoring):
    curve = faithfulness_curve(evaluator, scoring)
    n = evaluator.graph.n_edges
    assert curve.sizes == sizes_for(n) and curve.sizes[0] == 0 and curve.sizes[-1] == n
    assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0
    masks = torch.stack([top_n_mask(scoring.scores, size) for size in curve.sizes[1:-1]])
    direct = evaluator.faithfulness(masks)
    assert torch.allclose(direct, torch.tensor(curve.faithfulness[1:-1]), atol=64 * EPS, rtol=0)
    assert len(curve.records()) == len(curve.sizes) and set(curve.summary()) >= {"cpr", "cmd"}
    greedy = faithfulness_curve(evaluator, scoring, greedy=True)
    assert greedy.sizes == sorted(greedy.sizes) and greedy.faithfulness[-1] == 1.0


def test_smallest_circuit_reaching_a_target(evaluator, scoring):
    target = 0.5
    circuit, reached = smallest_faithful_circuit(evaluator, scoring, target)
    assert reached >= target and faithfulness_of(evaluator, circuit) == pytest.approx(reached, abs=64 * EPS)
    one_less = Circuit(evaluator.graph, top_n_mask(scoring.scores, circuit.n_edges - 1))
    assert faithfulness_of(evaluator, one_less) < target
    full, reached_full = smallest_faithful_circuit(evaluator, scoring, 1.0)
    assert reached_full >= 1.0 - 16 * EPS and full.n_edges >= circuit.n_edges
    with pytest.raises(DiscoveryError, match=r"\(0, 1\]"):
        smallest_faithful_circuit(evaluator, scoring, 1.2)


def test_circuit_for_another_graph_is_refused(evaluator, toy_attn_only):
    from circuitlab.graph.graph import Graph

    other = Circuit.full(Graph.from_model(toy_attn_only))
    with pytest.raises(DiscoveryError, match="circuit is for"):
        faithfulness_of(evaluator, other)


def test_undefined_when_ablation_changes_nothing(toy):
    from circuitlab.tasks.task import Example, Task

    same = Task("same", [Example("When Mary and John", "When Mary and John", [" Mary"], [" John"])])
    with pytest.raises(DiscoveryError, match="faithfulness is undefined"):
        CircuitEvaluator(toy, same)


@pytest.mark.parametrize("base_kind", ["circuit", "full"])
def test_rows_restarted_from_a_recorded_base_equal_plain_runs(evaluator, base_kind):
    """per_prompt(masks, base=B): each row is B with some senders' out-edges removed (as verification's
    minimality and completeness build them); restarted from B's recorded run, the values equal the plain
    runs' to float32 rounding of the metric (64 eps relative)."""
    graph = evaluator.graph
    gen = torch.Generator().manual_seed(4)
    base = torch.ones(graph.n_edges, dtype=torch.bool)
    if base_kind == "circuit":
        base = torch.rand(graph.n_edges, generator=gen) < 0.6
    layer = evaluator.engine.edge_layer  # senders feeding only layers >= 1: every row restarts at 1 or later
    senders = [s for s in range(1, graph.n_senders) if int(layer[graph.edge_src == s].min()) >= 1]
    masks = torch.stack([base & (graph.edge_src != s) for s in senders])
    plain = evaluator.per_prompt(masks)
    calls = []
    handle = evaluator.engine.bridge.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        restarted = evaluator.per_prompt(masks, base=base)
    finally:
        handle.remove()
    assert len(calls) == len(evaluator.inputs)  # block 0 ran in the recorded base runs only: rows restarted
    scale = plain.abs().max().clamp_min(1.0)
    assert (restarted - plain).abs().max() <= 64 * torch.finfo(torch.float32).eps * scale
    assert (plain[0] - plain[-1]).abs().max() > 1e-4  # the removals matter
