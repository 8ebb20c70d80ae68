"""`run`: options, task and --out are checked before the model loads; one write of the run directory."""

from __future__ import annotations

import json

import pytest
from conftest import IOI_LIKE_ROWS

from circuitlab.errors import AnalysisError, OutputError, TaskError
from circuitlab.results import load_results
from circuitlab.runner import get_analysis, run
from circuitlab.tasks import Example, Task


@pytest.fixture
def names_task():
    return Task("names", [Example(**row) for row in IOI_LIKE_ROWS])


@pytest.mark.parametrize("call, error, message", [
    (dict(analysis="no-such-analysis", task="ioi"), AnalysisError, "choose one of"),
    (dict(analysis="eval", task="ioi", bogus=1), AnalysisError, "takes no option"),
    (dict(analysis="eval", task="no-such-task"), TaskError, "built-in"),
    (dict(analysis="eval", task="missing.jsonl"), TaskError, "does not exist"),
    (dict(analysis="eval", task="ioi", n=0), TaskError, "n must be"),
    (dict(analysis="eval"), AnalysisError, "needs a task"),
])
def test_bad_input_fails_before_the_model_loads(no_model_load, call, error, message):
    analysis = call.pop("analysis")
    with pytest.raises(error, match=message):
        run(analysis, model="smollm2-135m", **call)


def test_bad_model_spec_fails_before_anything_else(no_model_load, tmp_path):
    from circuitlab.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        run("eval", model=str(tmp_path / "no" / "such-model"), task="ioi", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_out_fails_before_the_model_loads(no_model_load, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        run("eval", model="smollm2-135m", task="ioi", out=blocker)


def test_run_writes_one_whole_directory_with_its_record(toy, names_task, tmp_path):
    out = tmp_path / "eval"
    done = run("eval", model=toy, task=names_task, seed=3, out=out)
    assert done.result.command == "eval" and done.result.seed == 3
    saved = load_results(out)
    assert saved.records == json.loads(json.dumps(done.result.records))
    assert saved.task["n"] == len(IOI_LIKE_ROWS) and saved.model["spec"] == toy.spec
    assert saved.timing_s > 0 and "torch" in saved.versions
    assert sorted(p.name for p in out.iterdir()) == [".circuitlab-run", "report.html", "results.csv", "results.json"]


def test_every_registered_analysis_has_one_signature():
    from circuitlab.analysis import Analysis
    from circuitlab.runner import analysis_names

    for name in analysis_names():
        entry = get_analysis(name)
        assert isinstance(entry, Analysis) and entry.name == name
        assert entry.task in ("required", "optional", "none")
