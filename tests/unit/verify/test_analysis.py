"""The `verify` analysis through the runner: its run directory, its verdict, and inputs checked before loading."""

from __future__ import annotations

import json

import pytest

from circuitlab.errors import CircuitlabError, GraphError, VerifyError
from circuitlab.results import load_results
from circuitlab.runner import run

QUICK = {"n_bootstrap": 100, "subsets": 2, "greedy_steps": 1, "noise": (0.0, 0.2)}


@pytest.fixture(scope="module")
def truth_file(handset, tmp_path_factory):
    _, _, truth = handset
    return str(truth.save(tmp_path_factory.mktemp("truth") / "truth.json"))


def test_verify_writes_its_run_directory(handset, truth_file, tmp_path):
    model, task, truth = handset
    out = tmp_path / "v"
    done = run("verify", model=model, task=task, out=out, circuit=truth_file, split="test", compare=truth_file,
               per_edge=True, **QUICK)
    result = load_results(out)
    summary = result.summary
    assert result.command == "verify" and result.params["circuit"] == truth_file
    assert summary["faithfulness"] >= 0.95 and summary["faithfulness_ci_low"] <= summary["faithfulness"]
    assert summary["n_prompts"] == 3 and summary["n_prompts_other_split"] == 3 and summary["split"] == "test"
    assert summary["faithfulness_other_split"] >= 0.95
    assert summary["compare_edge_jaccard"] == 1.0 and summary["n_non_minimal"] == 0
    assert {"faithfulness_mean", "faithfulness_zero", "faithfulness_resample"} <= set(summary)
    assert len(result.records) == len(truth.edges) + 2  # every edge and both heads
    for name in ("consistency.csv", "completeness.csv", "perturbation.csv", "ablations.csv", "faithfulness.png",
                 "minimality.png", "perturbation.png", "report.html"):
        assert (out / name).is_file(), name
    assert len((out / "consistency.csv").read_text().splitlines()) == 1 + 3
    verdict = done.output.verdict()
    assert verdict[0]["measure"].startswith("faithfulness") and all(set(r) == {"measure", "value", "95% CI"}
                                                                   for r in verdict)
    json.dumps(summary)  # plain data


def test_options_and_files_are_checked_before_the_model_loads(no_model_load, truth_file, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    cases = [
        ({"circuit": str(tmp_path / "missing.json")}, GraphError, "no circuit file"),
        ({"circuit": str(bad_json)}, GraphError, "not valid JSON"),
        ({"circuit": truth_file, "ablation": "shuffle"}, CircuitlabError, "unknown ablation 'shuffle'"),
        ({"circuit": truth_file, "compare": str(tmp_path / "none.json")}, GraphError, "no circuit file"),
        ({"circuit": truth_file, "split": "dev"}, VerifyError, "unknown split 'dev'"),
        ({"circuit": truth_file, "noise": (0.1, float("nan"))}, VerifyError, "noise levels"),
        ({"circuit": truth_file, "n_bootstrap": 0}, VerifyError, "n_bootstrap"),
        ({"circuit": truth_file, "epsilon": -1.0}, VerifyError, "epsilon"),
        ({"circuit": truth_file, "subsets": -2}, VerifyError, "subsets"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            run("verify", model="smollm2-135m", task="ioi", n=4, **options)
    with pytest.raises(VerifyError, match="test half needs at least 2"):
        run("verify", model="smollm2-135m", task="ioi", n=1, circuit=truth_file, split="test")


def test_a_circuit_for_another_model_names_both_shapes(toy, truth_file, tmp_path):
    from circuitlab.tasks.task import Example, Task

    task = Task("one", [Example("When Mary and John", "When Tom and Anna", [" Mary"], [" John"])])
    with pytest.raises(GraphError, match=r"was made for a model with 2 layers x 3 heads.*but .* has"):
        run("verify", model=toy, task=task, circuit=truth_file, **QUICK)
    assert not (tmp_path / "v").exists()
