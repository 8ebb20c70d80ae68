"""The induction study (studies/induction.py) on the trained ground-truth model, whose induction heads,
previous-token head and circuit are known (discovery/ground_truth.py): the study must find exactly them,
both partner methods must name the true partner, and ablating the heads must raise the loss far more than
ablating a control."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitlab.discovery.ground_truth import TRAINED, load_ground_truth
from circuitlab.errors import AnalysisError, TaskError
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import parse_node
from circuitlab.graph.path_patching import path_patch
from circuitlab.heads.composition import composition_scores
from circuitlab.runner import run
from circuitlab.runner.registry import get_analysis
from circuitlab.studies.induction import (
    InductionStudyParams,
    control_draws,
    find_induction_heads,
    induction_study,
    k_composition_columns,
    key_path_effects,
    spearman,
)
from circuitlab.tasks.task import Example, Task
from circuitlab.verify.measures import Verifier

F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return load_ground_truth(TRAINED, n=12)


@pytest.fixture(scope="module")
def study(trained):
    model, task, _ = trained
    return induction_study(model, task, InductionStudyParams(n_bootstrap=200))


def _truth_roles(truth) -> tuple[set[str], set[str]]:
    """(induction heads, previous-token heads) of the true circuit: the ends of its edges into a key."""
    into_keys = [e.split("->") for e in truth.edges if e.endswith("<k>")]
    return {r.split("<")[0] for _, r in into_keys}, {s for s, _ in into_keys}


def test_the_study_finds_the_true_heads_partners_and_circuit(trained, study):
    _, _, truth = trained
    induction, previous = _truth_roles(truth)
    assert set(study.heads) == induction
    scores = [float(study.scores[parse_node(h).layer, parse_node(h).head]) for h in study.heads]
    assert scores == sorted(scores, reverse=True)  # strongest first
    partners = study.partner_summary()
    assert set(partners) == induction
    for head, found in partners.items():
        assert {found["by_k_composition"]} == previous, head
        assert {found["by_path_patching"]} == previous, head
        assert found["top_agree"]
    assert sorted(study.circuit.edges) == sorted(truth.edges)
    assert study.faithfulness.low <= study.faithfulness.value <= study.faithfulness.high
    assert study.faithfulness.value > 0.9  # the true circuit keeps the behaviour under mean ablation


def test_ablating_the_induction_heads_raises_the_loss_beyond_the_control(study):
    assert study.loss_rise.low > 0  # the interval excludes 0
    assert study.control_rise is not None and study.rise_over_control is not None
    assert study.rise_over_control.low > 0
    assert study.loss_rise.value > 10 * abs(study.control_rise.value)
    circuit_heads = set(study.heads) | {p for ps in study.kept_partners.values() for p in ps}
    assert all(not set(draw) & circuit_heads for draw in study.control_heads)
    assert study.ablated_loss == pytest.approx(study.clean_loss + study.loss_rise.value, rel=1e-6)


def test_key_path_effects_equal_masked_path_patching(trained, study):
    """The restarted sweep agrees with one full masked path-patching run per sender (graph/path_patching.py)."""
    model, task, _ = trained
    prepared = task.prepare(model)
    verifier = Verifier(model, prepared, study.circuit.graph, ablation="mean", n_bootstrap=10)
    head, senders = "a1.h0", ["a0.h0", "a0.h2"]
    effects = key_path_effects(verifier, prepared, head, senders)
    engine = MaskedEdgeEngine(model)
    batch = prepared.batches[0]
    with torch.no_grad():
        clean = float(prepared.metric(model.logits(batch.clean), batch).mean())
        resampled = float(prepared.metric(model.logits(batch.clean.roll(1, 0)), batch).mean())
    for sender, effect in zip(senders, effects, strict=True):
        patched = float(prepared.metric(path_patch(engine, sender, f"{head}<k>", batch.clean, batch.clean.roll(1, 0)),
                                        batch).mean())
        reference = (clean - patched) / (clean - resampled)
        # metric means of order 10 over float32 runs that sum in different orders, divided by the gap (~10)
        assert effect == pytest.approx(reference, abs=1e3 * F32), sender


def test_records_one_row_per_induction_head_and_earlier_head(study):
    rows = study.records()
    n_earlier = len(study.partners[0].senders)
    assert len(rows) == len(study.heads) * n_earlier
    for head in study.heads:
        mine = [r for r in rows if r["induction_head"] == head]
        assert sorted(r["path_rank"] for r in mine) == list(range(1, n_earlier + 1))
        assert sorted(r["composition_rank"] for r in mine) == list(range(1, n_earlier + 1))
        assert sum(r["in_circuit"] for r in mine) == 1
        best = min(mine, key=lambda r: r["path_rank"])
        assert best["path_effect"] == max(r["path_effect"] for r in mine) and best["in_circuit"]


def test_the_runner_writes_the_study(tmp_path, trained):
    model, task, _ = trained
    done = run("study/induction", model=model, task=task, out=tmp_path / "ind", n_bootstrap=50, n_controls=2)
    assert {"circuit.json", "circuit.png", "findings.md", "induction_scores.png",
            "partners.png"} <= set(done.result.artifacts)
    summary = done.result.summary
    json.dumps(summary)
    assert summary["partners_agree"] == summary["partners_compared"] == 4
    assert summary["loss_rise_ci_low"] > 0
    saved = json.loads((tmp_path / "ind" / "circuit.json").read_text())
    assert len(saved["edges"]) > 0 and sum(e["in_graph"] for e in saved["edges"].values()) == 17
    findings = (tmp_path / "ind" / "findings.md").read_text()
    assert "a0.h2" in findings and "Mean-ablating the 4 induction heads" in findings


def test_options_are_checked_without_a_model():
    entry = get_analysis("study/induction")
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"max_heads": 0}, {"n_partners": True}, {"n_bootstrap": 0}):
        with pytest.raises(AnalysisError):
            entry.make_params(bad)
    assert entry.make_params({}).threshold == 0.4


def test_a_task_without_induction_targets_is_refused(toy):
    names = Task("names", [Example("When Mary and John went to the store , John gave a drink to",
                                   "When Tom and Anna went to the store , Paul gave a drink to", [" Mary"], [" John"])])
    with pytest.raises(TaskError, match="induction_logprob"):
        induction_study(toy, names, InductionStudyParams())


def test_no_head_above_the_threshold_names_the_best_one():
    scores = torch.tensor([[0.9, 0.1], [0.3, 0.2]])  # layer 0 never counts: it has no earlier head
    assert find_induction_heads(scores, 0.25, 4) == ["a1.h0"]
    assert find_induction_heads(torch.tensor([[0.1, 0.1], [0.5, 0.7]]), 0.4, 1) == ["a1.h1"]
    assert find_induction_heads(scores, 0.5, 4) == []


def test_spearman_and_control_draws(toy):
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))
    draws = control_draws(toy, {"a0.h0"}, 2, 3, seed=0)
    assert len(draws) == 3 and all(len(d) == 2 and "a0.h0" not in d for d in draws)
    assert draws == control_draws(toy, {"a0.h0"}, 2, 3, seed=0)  # seeded


def test_k_composition_columns_are_the_heads_package_scores(trained):
    model, _, _ = trained
    columns, baseline = k_composition_columns(model, ["a1.h0", "a1.h3"])
    full = composition_scores(model)
    for head in ("a1.h0", "a1.h3"):
        h = int(head[-1])
        assert torch.tensor(columns[head]) == pytest.approx(full.scores["k"][0, :, 1, h], abs=16 * F32)
    assert baseline == pytest.approx(full.baseline["k"])
