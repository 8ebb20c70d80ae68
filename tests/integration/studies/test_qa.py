"""The document-QA study on SmolLM2-135M (2 prompts, the top 2 heads; the head map of all 270 heads is the
cost)."""

from __future__ import annotations

import math

from circuitlab.studies.qa import QAStudyParams, qa_study
from circuitlab.tasks.registry import make_task


def test_smollm_qa_heads_and_their_circuit(smollm):
    task = make_task("qa", smollm, n=2)
    study = qa_study(smollm, task, QAStudyParams(top_k=2, n_bootstrap=100, curve=False))
    assert len(study.discovery.kept) == 2
    effects = [abs(study.discovery.node_scores[h]) for h in study.discovery.kept]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0
    assert study.discovery.circuit.stats()["n_heads"] == 2
    assert math.isfinite(study.faithfulness.value) and math.isfinite(study.mlps_only.value)
    assert len(study.records()) == smollm.n_layers * smollm.n_heads
    assert "## Circuit" in study.findings()
