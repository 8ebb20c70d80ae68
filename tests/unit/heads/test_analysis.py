"""The `heads` analysis: options checked before any model, records, figures and composition.csv."""

from __future__ import annotations

import csv
import io

import pytest

from circuitlab.errors import HeadsError
from circuitlab.heads.analysis import SCORES, HeadsParams, head_analysis
from circuitlab.runner import run


@pytest.mark.parametrize("options", [{"n_repeat_tokens": 0}, {"n_sequences": -1}, {"top": True}, {"seed": "1"}])
def test_params_are_checked(options):
    with pytest.raises(HeadsError):
        HeadsParams(**options)


def test_bad_option_fails_before_the_model_loads(no_model_load):
    with pytest.raises(HeadsError, match="n_repeat_tokens"):
        run("heads", model="smollm2-135m", n_repeat_tokens=0)


def test_head_analysis_on_the_toy_model(toy, names_task):
    result = head_analysis(toy, names_task, HeadsParams(n_repeat_tokens=6, n_sequences=2, top=3))
    records = result.records()
    assert len(records) == toy.n_layers * toy.n_heads
    assert all(0 <= r[k] <= 1 + 1e-6 for r in records for k in SCORES)
    later = [r for r in records if r["layer"] > 0]
    assert all(r["k_partner"].startswith("a0.") and 0 < r["k_composition"] <= 1 for r in later)
    summary = result.summary()
    assert summary["bos_measured_on"] == "task names"
    assert all(len(summary["top"][k]) == 3 for k in SCORES)
    assert set(result.figures()) == {*(f"heads_{k}.png" for k in SCORES), "composition_q.png", "composition_k.png",
                                     "composition_v.png"}
    rows = list(csv.DictReader(io.StringIO(result.files()["composition.csv"])))
    assert len(rows) == toy.n_heads ** 2 and set(rows[0]) == {"writer", "reader", "q", "k", "v"}
