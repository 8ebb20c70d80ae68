"""ACDC: the published order, batched == sequential edge for edge, the hand-set truth recovered, bad tau,
and the `discover/acdc` run directory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitlab.discovery.acdc import (
    acdc,
    acdc_sequential,
    check_tau,
    incoming_edges,
    receiver_order,
    search_order,
)
from circuitlab.discovery.acdc_analysis import ACDCParams
from circuitlab.discovery.ground_truth import HANDSET, load_ground_truth
from circuitlab.errors import DiscoveryError
from circuitlab.graph.graph import Graph, GraphShape
from circuitlab.runner import run

EPS = torch.finfo(torch.float32).eps


def test_receivers_and_edges_follow_the_published_order():
    """The public ACDC correspondence: logits; per layer (last first) the MLP, then the q inputs of heads
    H-1..0, their k inputs, their v inputs; each receiver's parents latest sender first."""
    graph = Graph(GraphShape(n_layers=2, n_heads=2))
    names = [graph.receivers[r] for r in receiver_order(graph)]
    assert names == ["logits", "m1", "a1.h1<q>", "a1.h0<q>", "a1.h1<k>", "a1.h0<k>", "a1.h1<v>", "a1.h0<v>",
                     "m0", "a0.h1<q>", "a0.h0<q>", "a0.h1<k>", "a0.h0<k>", "a0.h1<v>", "a0.h0<v>"]
    assert sorted(receiver_order(graph)) == list(range(graph.n_receivers))
    incoming = incoming_edges(graph)
    into = {graph.receivers[r]: [graph.edges[e].split("->")[0] for e in incoming[r].tolist()]
            for r in range(graph.n_receivers)}
    assert into["logits"] == ["m1", "a1.h1", "a1.h0", "m0", "a0.h1", "a0.h0", "input"]
    assert into["m1"] == ["a1.h1", "a1.h0", "m0", "a0.h1", "a0.h0", "input"]
    assert into["a1.h0<k>"] == ["m0", "a0.h1", "a0.h0", "input"]
    assert sum(len(edges) for edges in incoming) == graph.n_edges


def test_head_level_order_groups_each_senders_q_k_v_edges():
    """level 'head': a head's q, k and v inputs are one receiver (heads H-1..0 after the MLP, per layer last
    first), and its candidate from one sender holds that sender's three edges into it."""
    graph = Graph(GraphShape(n_layers=2, n_heads=2))
    order = search_order(graph, "head")
    assert order.names == ["logits", "m1", "a1.h1", "a1.h0", "m0", "a0.h1", "a0.h0"]
    into = order.candidates[order.names.index("a1.h0")]
    assert [graph.edges[int(c[0])].split("->")[0] for c in into] == ["m0", "a0.h1", "a0.h0", "input"]
    assert sorted(graph.edges[e] for e in into[0].tolist()) == ["m0->a1.h0<k>", "m0->a1.h0<q>", "m0->a1.h0<v>"]
    every = torch.cat([c for candidates in order.candidates for c in candidates])
    assert sorted(every.tolist()) == list(range(graph.n_edges))  # each edge in exactly one candidate
    edge = search_order(graph, "edge")
    assert edge.names == [graph.receivers[r] for r in receiver_order(graph)]
    assert all(len(c) == 1 for candidates in edge.candidates for c in candidates)
    with pytest.raises(DiscoveryError, match="level must be"):
        search_order(graph, "node")


@pytest.mark.parametrize("ablation, tau", [("corrupt", 0.002), ("zero", 0.01)])
def test_head_level_batched_equals_sequential_and_removes_q_k_v_together(toy, names_task, ablation, tau):
    fast = acdc(toy, names_task, tau=tau, ablation=ablation, level="head")
    plain = acdc_sequential(toy, names_task, tau=tau, ablation=ablation, level="head")
    assert _margin(plain, tau) > 100 * EPS  # as in the edge-level test below
    assert torch.equal(fast.in_graph, plain.in_graph) and fast.level == "head"
    candidates = [c for cs in search_order(fast.graph, "head").candidates for c in cs]
    for candidate in candidates:  # a sender's edges into a head's q, k and v: all kept or all removed
        assert bool(fast.in_graph[candidate].all()) or not bool(fast.in_graph[candidate].any())
    tested = sum(1 for c in candidates if not math.isnan(float(plain.scores[c[0]])))
    assert plain.n_circuits == tested + 1  # one run per tested candidate, plus the full model
    assert tested < int(acdc(toy, names_task, tau=tau, ablation=ablation).tested.sum())


def _margin(result, tau):
    """Distance of the nearest tested edge's damage to tau (decisions closer than float32 rounding to tau
    may differ between batched and sequential runs, which group the same sums differently)."""
    scores = result.scores[result.tested]
    damage = -scores if result.higher_is_better else scores
    return float((damage - tau).abs().min())


@pytest.mark.parametrize("model_name, ablation, tau", [
    ("toy", "corrupt", 0.002), ("toy", "mean", 0.0005), ("toy", "resample", 0.001), ("toy_attn_only", "zero", 0.01),
])
def test_batched_equals_sequential_edge_for_edge(request, names_task, model_name, ablation, tau):
    model = request.getfixturevalue(model_name)
    fast = acdc(model, names_task, tau=tau, ablation=ablation, seed=3)
    plain = acdc_sequential(model, names_task, tau=tau, ablation=ablation, seed=3)
    # Both compute each damage (a KL difference of float32 logits) to within a few eps (measured <= 3 eps);
    # the test's taus lie at least 100 eps from every damage, so no decision sits within rounding of tau.
    assert _margin(plain, tau) > 100 * EPS
    assert torch.equal(fast.in_graph, plain.in_graph), (fast.circuit().edges, plain.circuit().edges)
    assert torch.equal(fast.tested, plain.tested)
    assert torch.allclose(fast.scores[fast.tested], plain.scores[plain.tested], atol=64 * EPS, rtol=0)
    assert [s.removed for s in fast.steps] == [s.removed for s in plain.steps]
    assert fast.n_forwards < plain.n_forwards
    assert plain.n_circuits == int(plain.tested.sum()) + 1  # one run per tested edge, plus the full model


def test_speculation_is_exercised(toy, names_task):
    """Some receiver keeps an edge and removes another, so later batches run on predicted decisions."""
    fast = acdc(toy, names_task, tau=0.01, ablation="zero")
    mixed = [s for s in fast.steps if not s.skipped and 0 < s.removed < s.edges]
    assert mixed and any(s.forwards > 1 for s in mixed)
    assert fast.n_circuits > int(fast.tested.sum())  # some candidates were evaluated again


def test_handset_truth_is_recovered_with_zero_ablation():
    """Every edge outside the hand-set circuit has exactly no effect and every true edge moves the KL by
    far more than tau, so ACDC keeps exactly the true circuit. Heads with no edge left towards the logits
    are skipped: their inputs are removed untested."""
    model, task, truth = load_ground_truth(HANDSET, n=4, ablation="zero")
    found = acdc(model, task, tau=0.1, ablation="zero")
    assert sorted(found.circuit().edges) == sorted(truth.edges)
    assert float(found.scores[truth.in_graph].min()) > 0.1
    skipped = {s.receiver.split("<")[0] for s in found.steps if s.skipped}
    assert skipped == {"a1.h0", "a1.h1", "a0.h0", "a0.h2"}
    assert math.isnan(float(found.scores[found.graph.edge_id("input->a1.h0<q>")]))


@pytest.mark.parametrize("tau", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_tau_is_a_clear_error(tau, toy, names_task):
    with pytest.raises(DiscoveryError, match="tau must be a finite number >= 0"):
        check_tau(tau)
    with pytest.raises(DiscoveryError, match="tau must be"):
        ACDCParams(tau=tau)
    with pytest.raises(DiscoveryError, match="tau must be"):
        acdc(toy, names_task, tau=tau)


def test_partial_run_visits_the_first_receivers(toy, names_task):
    partial = acdc(toy, names_task, tau=0.01, receivers=3)
    assert [s.receiver for s in partial.steps] == ["logits", "m1", "a1.h3<q>"][:len(partial.steps)]
    assert len(partial.steps) == 3
    untouched = torch.isin(partial.graph.edge_dst, torch.tensor(receiver_order(partial.graph)[3:]))
    assert bool(partial.in_graph[untouched].all()) and not bool(partial.tested[untouched].any())
    with pytest.raises(DiscoveryError, match="receivers must be an integer"):
        acdc(toy, names_task, receivers=0)


def test_run_writes_circuit_log_and_faithfulness(tmp_path, toy, names_task):
    out = tmp_path / "acdc"
    done = run("discover/acdc", model=toy, task=names_task, out=out, tau=0.01, ablation="zero")
    assert sorted(done.result.artifacts) == ["acdc_log.json", "circuit.dot", "circuit.json", "circuit.png"]
    summary = done.result.summary
    found = done.output.run
    assert summary["method"] == "acdc" and summary["tau"] == 0.01 and summary["metric"] == "kl"
    assert summary["circuit_edges"] == found.n_edges and summary["forwards"] == found.n_forwards
    assert summary["edges_removed"] == found.graph.n_edges - found.n_edges
    assert math.isfinite(summary["faithfulness"])
    records = done.result.records
    assert len(records) == found.graph.n_edges and sum(r["in_graph"] for r in records) == found.n_edges
    assert sum(r["tested"] for r in records) == summary["edges_tested"]
    data = json.loads((out / "circuit.json").read_text())
    assert sum(e["in_graph"] for e in data["edges"].values()) == found.n_edges
    log = json.loads((out / "acdc_log.json").read_text())
    assert log[0]["receiver"] == "logits" and sum(row["removed"] for row in log) == summary["edges_removed"]
    assert done.result.params["tau"] == 0.01
