"""The `trace` and `trace/average` analysis entries: options checked without a model, one bar per run."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from circuitlab.errors import CausalTraceError
from circuitlab.patching.trace_analysis import TRACE, TRACE_AVERAGE, AverageTraceParams, TraceParams
from circuitlab.runner import get_analysis, run

PROMPT, SUBJECT, TARGET = "The capital of France is in", "capital of France", "Paris"




def test_registered():
    assert get_analysis("trace") is TRACE and TRACE.task == "none"
    assert get_analysis("trace/average") is TRACE_AVERAGE and TRACE_AVERAGE.task == "required"


@pytest.mark.parametrize("options, message", [
    ({"kind": "heads"}, "unknown trace kind 'heads'; choose one of resid, mlp, attn, all"),
    ({"samples": 0}, "samples must be"),
    ({"noise": -1.0}, "noise must be"),
    ({"noise": float("nan")}, "noise must be"),
    ({"window": 0}, "window must be"),
    ({"subject": "Berlin"}, "does not occur in the prompt"),
    ({"subject": " "}, "subject is empty"),
    ({"target": ""}, "target is empty"),
])
def test_bad_trace_options_fail_before_the_model_loads(no_model_load, options, message):
    with pytest.raises(CausalTraceError, match=message):
        run("trace", model="smollm2-135m", **{"prompt": PROMPT, "subject": SUBJECT, "target": TARGET, **options})


def test_bad_average_options_fail_before_the_model_loads(no_model_load):
    with pytest.raises(CausalTraceError, match="unknown trace kind"):
        run("trace/average", model="smollm2-135m", task="facts", kind="resid_post")
    assert AverageTraceParams(kind="all").kind == "all"


def test_run_seed_reaches_the_noise(toy):
    a = run("trace", model=toy, seed=5, prompt=PROMPT, subject=SUBJECT, target=TARGET, kind="resid", samples=2)
    b = run("trace", model=toy, seed=5, prompt=PROMPT, subject=SUBJECT, target=TARGET, kind="resid", samples=2)
    c = run("trace", model=toy, seed=6, prompt=PROMPT, subject=SUBJECT, target=TARGET, kind="resid", samples=2)
    assert a.result.params["seed"] == 5 and a.output.tracer.seed == 5
    assert a.result.summary["corrupt_prob"] == b.result.summary["corrupt_prob"] != c.result.summary["corrupt_prob"]


def test_one_bar_that_ends_at_its_total(toy, monkeypatch):
    import circuitlab.patching.trace_analysis as module

    calls = []

    @contextmanager
    def bar(total, description):
        done = []
        calls.append((total, done))
        yield done.append

    monkeypatch.setattr(module, "progress_bar", bar)
    done = run("trace", model=toy, prompt=PROMPT, subject=SUBJECT, target=TARGET, kind="all", samples=2, window=2)
    [(total, advanced)] = calls
    assert total == sum(advanced) == len(done.result.records)  # one (kind, position, layer) cell per record
    assert isinstance(TraceParams(PROMPT, SUBJECT, TARGET).seed, int)
