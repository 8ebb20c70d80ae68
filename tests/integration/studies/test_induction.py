"""The induction study on SmolLM2-135M (tiny: 2 prompts of 8 repeated tokens, one induction head)."""

from __future__ import annotations

import math

import pytest

from circuitlab.studies.induction import InductionStudyParams, induction_study
from circuitlab.tasks.registry import make_task


@pytest.fixture(scope="module")
def study(smollm):
    task = make_task("induction", smollm, n=2, seq_len=8)
    return induction_study(smollm, task, InductionStudyParams(max_heads=1, n_controls=1, n_bootstrap=100))


def test_smollm_has_an_induction_head_with_a_partner(study, smollm):
    (head,) = study.heads
    score = study.head_intervals[head]
    # far above chance: a uniform causal head puts about 1/9 of a second-copy position's attention on its target
    assert score.value >= 0.4 and score.value > 4 * study.uniform
    partner = study.partner_summary()[head]
    assert partner["by_path_patching"] in study.partners[0].senders
    assert -1 <= partner["spearman"] <= 1
    assert max(study.partners[0].path_effect) > 0  # some earlier head's path into the key carries the behaviour
    assert study.loss_rise.value > 0
    assert math.isfinite(study.faithfulness.value)
    assert "## Ablation" in study.findings()
