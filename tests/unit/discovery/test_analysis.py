"""The `discover/*` entries: options checked before the model loads, the run directory they write, and
circuit.json read back (and refused for another model)."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlab.discovery.analysis import DiscoverParams
from circuitlab.errors import DiscoveryError, GraphError
from circuitlab.graph.circuit import Circuit
from circuitlab.runner import run
from circuitlab.runner.registry import get_analysis


@pytest.mark.parametrize("options, message", [
    ({"top_n": 3, "threshold": 0.1}, "mutually exclusive"),
    ({"threshold": 0.1, "target_faithfulness": 0.5}, "mutually exclusive"),
    ({"threshold": -1.0}, "threshold must be a number >= 0"),
    ({"target_faithfulness": 0.0}, r"must lie in \(0, 1\]"),
    ({"target_faithfulness": 1.01}, r"must lie in \(0, 1\]"),
    ({"top_n": -2}, "non-negative integer"),
    ({"score_metric": "accuracy"}, "unknown metric"),
    ({"positions": "all"}, None),  # the task metric is known only once built: checked in compute
    ({"score_metric": "logprob", "positions": "all"}, "positions all needs kl or l2"),
    ({"ablation": "noise"}, "unknown ablation"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"greedy": True, "threshold": 0.1}, "greedy"),
])
def test_params_are_checked_without_a_model(options, message):
    if message is None:
        assert DiscoverParams(**options).positions == "all"
        return
    with pytest.raises(DiscoveryError, match=message):
        DiscoverParams(**options)


def test_every_method_is_registered():
    for method in ("eap", "eap-ig", "exact"):
        entry = get_analysis(f"discover/{method}")
        assert entry.name == f"discover/{method}" and entry.params is DiscoverParams


def test_run_writes_circuit_json_picture_and_curve(tmp_path, toy, toy_attn_only, names_task):
    out = tmp_path / "eap"
    done = run("discover/eap", model=toy, task=names_task, out=out, top_n=12)
    graph_edges = done.output.scoring.graph.n_edges
    assert sorted(done.result.artifacts) == ["circuit.dot", "circuit.json", "circuit.png", "faithfulness.png"]
    summary = done.result.summary
    assert summary["circuit_edges"] == 12 and summary["graph_edges"] == graph_edges
    assert 0.0 <= summary["cpr"] and 0.0 <= summary["cmd"] and summary["selection"] == "top_n"
    records = done.result.records
    assert len(records) == graph_edges and sum(r["in_graph"] for r in records) == 12
    assert set(records[0]) >= {"sender", "receiver", "qkv", "score", "in_graph"}
    assert abs(records[0]["score"]) >= abs(records[-1]["score"])  # strongest first
    data = json.loads((out / "circuit.json").read_text())
    assert len(data["edges"]) == graph_edges and all(set(v) == {"score", "in_graph"} for v in data["edges"].values())
    loaded = Circuit.load(out / "circuit.json", model=toy)
    assert torch.equal(loaded.in_graph, done.output.circuit.in_graph)
    assert loaded.scores is not None and torch.allclose(loaded.scores, done.output.scoring.scores)
    with pytest.raises(GraphError, match="was made for a model with"):
        Circuit.load(out / "circuit.json", model=toy_attn_only)


def test_default_selection_is_the_smallest_circuit_reaching_08(tmp_path, toy, names_task):
    done = run("discover/eap-ig", model=toy, task=names_task, steps=2, score_metric="kl", positions="all")
    summary = done.result.summary
    assert summary["selection"] == "target_faithfulness" and summary["selection_value"] == 0.8
    assert summary["faithfulness"] >= 0.8 and summary["metric"] == "kl" and summary["steps"] == 2


def test_top_n_larger_than_the_graph_fails_before_scoring(tmp_path, toy, names_task):
    with pytest.raises(DiscoveryError, match="larger than the graph, which has 110 edges"):
        run("discover/exact", model=toy, task=names_task, out=tmp_path / "x", top_n=111)
    assert not (tmp_path / "x").exists()


def test_answerless_tasks_with_kl_and_l2_only(tmp_path, toy):
    """A Task without answers runs with kl (the hook lifts require_answers), and the task metric refuses it
    with a DiscoveryError naming the fix instead of scoring a padding id."""
    from circuitlab.discovery.analysis import answers_optional
    from circuitlab.discovery.scores import edge_scores
    from circuitlab.tasks.source import TaskSource
    from circuitlab.tasks.task import Example, Task

    bare = Task("bare", [Example("a b c d", "a e c d", [])], require_answers=False)
    done = run("discover/eap", model=toy, task=Task("bare", bare.examples), score_metric="l2", top_n=4)
    assert done.result.summary["metric"] == "l2" and done.result.summary["circuit_edges"] == 4
    with pytest.raises(DiscoveryError, match="without an answer.*score with kl or l2"):
        edge_scores(toy, bare, method="eap")
    source = TaskSource(name="ioi", n=2)
    assert answers_optional(source, DiscoverParams(score_metric="kl")) is source  # built-ins have answers
    assert answers_optional(source, DiscoverParams()) is source
