"""Expand-and-prune (`discover/grow`): options checked without a model, seed nodes checked against the graph
with close names, the hand-set ground truth recovered from the logits (and from its induction head),
max_edges respected, and the run directory (grow.png, grow_log.csv, the round log)."""

from __future__ import annotations

import pytest

from circuitlab.discovery.faithfulness import CircuitEvaluator
from circuitlab.discovery.ground_truth import HANDSET, load_ground_truth
from circuitlab.discovery.grow import GrowParams, check_seed_nodes, grow, grow_circuit
from circuitlab.discovery.scores import edge_scores
from circuitlab.errors import DiscoveryError
from circuitlab.graph.graph import Graph
from circuitlab.runner import run
from circuitlab.runner.registry import get_analysis

N = 4  # prompts of the hand-set task


@pytest.fixture(scope="module")
def handset():
    model, task, truth = load_ground_truth(HANDSET, n=N)
    scores = edge_scores(model, task, method="eap-ig", steps=2).scores
    return model, task, truth, scores, CircuitEvaluator(model, task)


@pytest.mark.parametrize("options, message", [
    ({"seed_nodes": "a0.h1"}, "tuple of node names"),
    ({"seed_nodes": ()}, "at least one node"),
    ({"seed_nodes": ("a0.h1", "")}, "tuple of node names"),
    ({"max_edges": 0}, "max edges must be a positive integer"),
    ({"per_round": -1}, "per round must be a positive integer"),
    ({"epsilon": -0.1}, "epsilon must be a number >= 0"),
    ({"scorer": "acdc"}, "unknown discovery method"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"ablation": "noise"}, "unknown ablation"),
])
def test_params_are_checked_without_a_model(options, message):
    with pytest.raises(DiscoveryError, match=message):
        GrowParams(**options)


def test_entry_takes_the_cli_options():
    accepted = get_analysis("discover/grow").option_names()
    assert {"ablation", "score_metric", "positions", "seed_nodes", "max_edges", "steps", "seed"} <= accepted
    assert not {"top_n", "threshold", "tau", "target_edges"} & accepted


def test_unknown_seed_node_lists_close_names(handset):
    graph = Graph.from_model(handset[0])
    assert check_seed_nodes(graph, ("a1.h2", "logits")) == ("a1.h2", "logits")
    with pytest.raises(DiscoveryError, match=r"unknown seed node 'a1\.h7'.*close names: a1\.h"):
        check_seed_nodes(graph, ("a1.h7",))
    with pytest.raises(DiscoveryError, match="unknown seed node 'm0'"):  # attention-only: no MLPs
        check_seed_nodes(graph, ("m0",))


@pytest.mark.parametrize("seeds", [("logits",), ("a1.h2",)])
def test_grows_the_handset_truth(handset, seeds):
    """Only the true edges have non-zero scores and effects (test_ground_truth.py), so every round's
    zero-score additions are pruned again (their removal changes nothing) and the true ones stay: the
    grown circuit is exactly the truth, from the logits or from the induction head."""
    model, task, truth, scores, evaluator = handset
    growth = grow_circuit(evaluator, scores, seeds)
    assert sorted(growth.mask.nonzero().flatten().tolist()) == truth.in_graph.nonzero().flatten().tolist()
    assert growth.stopped.startswith("circuit unchanged")
    last = growth.rounds[-1]
    assert last.circuit_edges == truth.n_edges and last.circuit_faithfulness >= 1 - 1e-4
    assert all(r.added >= 1 for r in growth.rounds)


def test_max_edges_is_respected(handset):
    model, task, truth, scores, evaluator = handset
    growth = grow_circuit(evaluator, scores, max_edges=3, per_round=2)
    assert int(growth.mask.sum()) <= 3 and all(r.circuit_edges <= 3 for r in growth.rounds)
    assert growth.stopped == "max edges (3) reached"
    assert set(growth.mask.nonzero().flatten().tolist()) <= set(truth.in_graph.nonzero().flatten().tolist())


def test_grow_entry_on_the_handset(handset):
    model, task, truth, _, _ = handset
    done = grow(model, task, GrowParams(steps=2))
    assert done.circuit.edges == truth.edges and done.faithfulness >= 1 - 1e-4
    summary = done.summary()
    assert summary["seed_nodes"] == ["logits"] and summary["rounds"] == len(summary["round_log"]) >= 2


def test_run_writes_the_circuit_and_the_rounds(tmp_path, toy, names_task):
    out = tmp_path / "grow"
    done = run("discover/grow", model=toy, task=names_task, out=out, max_edges=6, steps=1,
               seed_nodes=("logits",))
    assert sorted(done.result.artifacts) == ["circuit.dot", "circuit.json", "circuit.png", "faithfulness.png",
                                             "grow.png", "grow_log.csv"]
    summary = done.result.summary
    assert summary["circuit_edges"] <= 6 and summary["rounds"] >= 1
    assert len((out / "grow_log.csv").read_text().splitlines()) == summary["rounds"] + 1


def test_unknown_seed_node_fails_before_scoring(tmp_path, toy, names_task):
    with pytest.raises(DiscoveryError, match=r"unknown seed node 'a0\.h9'"):
        run("discover/grow", model=toy, task=names_task, out=tmp_path / "x", seed_nodes=("a0.h9",))
    assert not (tmp_path / "x").exists()
