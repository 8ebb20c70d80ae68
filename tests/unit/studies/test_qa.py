"""The document-QA study (studies/qa.py): top-k heads of the head map, their node circuit and its verified
faithfulness. On the hand-set induction model the two true heads are the only heads that matter, so the
study must rank them first and their circuit must keep the whole behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from circuitlab.discovery.ground_truth import HANDSET, INDUCTION_HEAD, PREV_HEAD, load_ground_truth
from circuitlab.discovery.head_map import head_map
from circuitlab.errors import AnalysisError
from circuitlab.graph.naming import head_name
from circuitlab.runner import run
from circuitlab.runner.registry import get_analysis
from circuitlab.studies.qa import QAStudyParams, qa_study

F32 = torch.finfo(torch.float32).eps
TRUE_HEADS = {head_name(*PREV_HEAD), head_name(*INDUCTION_HEAD)}


@pytest.fixture(scope="module")
def handset():
    return load_ground_truth(HANDSET, n=6)


@pytest.fixture(scope="module")
def study(handset):
    model, task, _ = handset
    return qa_study(model, task, QAStudyParams(top_k=2, n_bootstrap=100, curve=False))


def test_the_top_heads_are_the_true_heads_and_their_circuit_is_faithful(study):
    assert set(study.discovery.kept) == TRUE_HEADS
    # the hand-set model's computation runs through those two heads only: f = 1 up to float32 rounding of
    # metric means of order 1 divided by a clean-corrupt gap of order 1
    assert study.faithfulness.value == pytest.approx(1.0, abs=1e3 * F32)
    assert study.mlps_only.value == pytest.approx(0.0, abs=1e3 * F32)  # no head: nothing reaches OUT
    assert study.faithfulness.low <= study.faithfulness.value + 1e-9
    assert len(study.growing) == 3  # 0, 1 and 2 heads


def test_records_summary_and_findings(study, handset):
    model, task, _ = handset
    rows = study.records()
    assert len(rows) == model.n_layers * model.n_heads
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    assert {r["node"] for r in rows if r["in_circuit"]} == TRUE_HEADS
    assert "faithfulness_up_to" in rows[1] and "faithfulness_up_to" not in rows[2]
    assert rows[1]["faithfulness_up_to"] == study.faithfulness.value
    effects = head_map(model, task).effects  # the study reports the head map's numbers, not its own
    assert max(abs(r["effect"]) for r in rows) == pytest.approx(float(effects.abs().max()))
    summary = study.summary()
    json.dumps(summary)
    assert len(summary["top_heads"]) == 2 and summary["faithfulness"] == study.faithfulness.value
    findings = study.findings()
    assert all(h in findings for h in TRUE_HEADS) and "Faithfulness under corrupt ablation" in findings


def test_the_runner_writes_the_study(tmp_path, handset):
    model, task, _ = handset
    done = run("study/qa", model=model, task=task, out=tmp_path / "qa", top_k=2, n_bootstrap=20, curve=False)
    assert {"circuit.json", "circuit.png", "findings.md"} <= set(done.result.artifacts)
    saved = json.loads((tmp_path / "qa" / "circuit.json").read_text())
    assert {n for n, v in saved["nodes"].items() if v["in_graph"] and n.startswith("a")} == TRUE_HEADS


def test_options_are_checked(handset):
    entry = get_analysis("study/qa")
    for bad in ({"top_k": 0}, {"top_k": 1.5}, {"n_bootstrap": -1}):
        with pytest.raises(AnalysisError):
            entry.make_params(bad)
    model, task, _ = handset
    with pytest.raises(AnalysisError, match="more than"):
        qa_study(model, task, QAStudyParams(top_k=model.n_layers * model.n_heads + 1))
