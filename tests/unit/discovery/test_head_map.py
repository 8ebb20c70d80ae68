"""Head-level causal map: the patching sweep of hook_z as node-level discovery. Its values agree with the
masked-edge engine (a head removed from the full node circuit), and it finds the hand-set model's true heads."""

from __future__ import annotations

import pytest
import torch

from circuitlab.discovery.faithfulness import CircuitEvaluator
from circuitlab.discovery.ground_truth import INDUCTION_HEAD, PREV_HEAD, load_ground_truth
from circuitlab.discovery.head_map import (
    DEFAULT_FRACTION,
    HeadsParams,
    discover_heads,
    head_map,
    select_heads,
)
from circuitlab.discovery.nodes import node_mask
from circuitlab.errors import DiscoveryError
from circuitlab.graph.naming import head_name, mlp_name

EPS = torch.finfo(torch.float32).eps


def test_a_heads_value_is_the_faithfulness_without_it(toy, names_task):
    """Noising head h's z = ablating every edge out of h: the patching value of h equals the normalised
    faithfulness of the node circuit of every other node (two engines, one number)."""
    prepared = names_task.prepare(toy)
    hmap = head_map(toy, prepared)
    evaluator = CircuitEvaluator(toy, prepared)
    nodes = [n for n in evaluator.graph.senders if n != "input"]
    masks = torch.stack([node_mask(evaluator.graph, [n for n in nodes if n != head]) for head in hmap.nodes])
    faithful = evaluator.faithfulness(masks)
    values = hmap.sweep.normalised()
    # Both are (m - m_corrupt) / (m_clean - m_corrupt) of float32 runs that order their sums differently.
    scale = 1 / abs(float(hmap.sweep.clean.mean() - hmap.sweep.corrupt.mean()))
    bound = 1e3 * EPS * max(1.0, scale * float(hmap.sweep.clean.abs().max()))
    assert (faithful - values).abs().max() <= bound, (faithful, values)
    assert (1 - values).abs().max() > 100 * bound  # some head matters


def test_handset_true_heads_are_the_map_circuit():
    """Every other head of the hand-set model has zero weights: its effect is exactly 0, the true heads' are
    near 1, so the default selection (a fraction 0.2 of the largest effect) keeps exactly the truth."""
    model, task, _ = load_ground_truth("handset-induction", n=4)
    result = discover_heads(model, task, HeadsParams())
    true = {head_name(*PREV_HEAD), head_name(*INDUCTION_HEAD)}
    rows = result.records()
    assert {r["node"] for r in rows[:2]} == true and set(result.kept) == true
    assert all(r["effect"] == 0 for r in rows[2:])
    assert min(r["effect"] for r in rows[:2]) > 0.5 > DEFAULT_FRACTION
    assert result.faithfulness == pytest.approx(1.0, abs=64 * EPS)
    summary = result.summary()
    assert summary["selection"] == "fraction_of_max" and summary["n_kept"] == 2 and summary["direction"] == "noise"
    assert set(result.figures()) == {"circuit.png", "heatmap_z_layer_head.png", "faithfulness.png"}
    assert set(result.files()) == {"circuit.json", "circuit.dot", "patching.json"}


def test_selection_and_mlps_kept(toy, names_task):
    hmap = head_map(toy, names_task)
    assert len(select_heads(hmap, top_n=3)) == 3
    assert select_heads(hmap, threshold=0.0) == [hmap.nodes[i] for i in hmap.ranked() if hmap.effects[i] != 0]
    with pytest.raises(DiscoveryError, match="number of heads"):
        select_heads(hmap, top_n=99)
    result = discover_heads(toy, names_task, HeadsParams(top_n=2))
    assert result.kept == [hmap.nodes[i] for i in hmap.ranked()[:2]]
    nodes = set(result.circuit.nodes)
    assert {mlp_name(layer) for layer in range(toy.n_layers)} <= nodes  # MLPs stay in the circuit
    assert {n for n in nodes if n.startswith("a")} == set(result.kept)


def test_bad_options_are_clear_errors():
    with pytest.raises(DiscoveryError, match="only 'corrupt' exists"):
        HeadsParams(ablation="mean")
    with pytest.raises(DiscoveryError, match="l2 does not apply"):
        HeadsParams(score_metric="l2")
    with pytest.raises(DiscoveryError, match="mutually exclusive"):
        HeadsParams(top_n=2, threshold=0.1)
    with pytest.raises(DiscoveryError, match="threshold"):
        HeadsParams(threshold=-1.0)
    assert HeadsParams(score_metric="kl").selection == ("fraction_of_max", DEFAULT_FRACTION)
