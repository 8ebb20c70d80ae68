"""The IOI study on SmolLM2-135M, kept small: four prompts of one template (one token-length group, so
every step runs one batch), two EAP-IG interpolation points, and a top-1000-edge circuit (no faithfulness
curve and search). The full study (16 prompts, every template, the smallest circuit with faithfulness 0.8)
is what `circuitlab study ioi --n 16` runs; its numbers are in docs/METHODS.md, "Case studies"."""

from __future__ import annotations

import math

import pytest

from circuitlab.studies.ioi import NAME_MOVER, IOIStudyParams, classify_head, ioi_study
from circuitlab.tasks.registry import make_task


@pytest.fixture(scope="module")
def study(smollm):
    task = make_task("ioi", smollm, n=4, seed=0, templates=[0])
    return ioi_study(smollm, task, IOIStudyParams(steps=2, top_n=1000, n_bootstrap=200, n_sequences=2))


def test_finds_a_name_mover_with_a_positive_direct_effect(study):
    assert study.logit_diff > 0  # SmolLM2 prefers the IO on these prompts
    movers = study.roles()[NAME_MOVER]
    assert movers, "no head passed the name-mover rule"
    for m in movers:
        assert m.dla > 0 and m.attn_io >= study.thresholds.attention and m.attn_io > m.attn_s1 + m.attn_s2
    # Heads late in the model move names (Wang et al.: layers 9-10 of GPT-2 small's 12).
    assert max(m.layer for m in movers) >= study.n_layers // 2


def test_the_circuit_is_verified_with_a_confidence_interval(study):
    f = study.faithfulness
    assert all(math.isfinite(x) for x in (f.value, f.low, f.high)) and f.low <= f.value <= f.high
    # The verifier measures the discovered mask again (its own masked-edge runs): the same number.
    assert study.discovery.circuit.n_edges == 1000
    assert f.value == pytest.approx(study.discovery.faithfulness, abs=1e-4)
    assert study.kl.value >= 0 and study.kl.low <= study.kl.value <= study.kl.high
    summary = study.summary()
    assert summary["faithfulness_ci"] == [f.low, f.high] and summary["name_movers"]


def test_records_show_the_numbers_their_role_comes_from(study):
    by_name = {m.name: m for m in study.measures}
    rows = study.records()
    assert rows and all((classify_head(by_name[r["head_name"]], study.thresholds) or "none") == r["role"] for r in rows)
    # Path patching into the name movers' queries ran on exactly the candidates attending END -> S2 above the
    # floor and before the latest name mover (earlier layers feed its query); the others could not be
    # S-inhibition heads.
    latest = max(m.layer for m in study.roles()[NAME_MOVER])
    for r in rows:
        measured = r["attn_s2"] >= study.thresholds.attention and r["layer"] < latest
        assert math.isnan(r["nm_query_effect"]) != measured, r["head_name"]
