"""The CLI on a toy native model saved to disk (fast): eval, tasks, models, bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()


def test_eval_writes_results(tmp_path, toy_dir, task_file):
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "--model", str(toy_dir), "--task", str(task_file), "--out", str(out), "--seed", "7"])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "eval" and result.seed == 7 and result.model["n_layers"] == 2
    assert result.task["name"] == "names" and len(result.records) == 2
    assert {"clean_metric", "corrupt_metric", "top1_correct"} <= set(result.records[0])
    assert result.summary["n_prompts"] == 2 and "torch" in result.versions
    assert (out / "results.csv").is_file()


def test_bad_inputs_exit_with_clear_message(tmp_path, toy_dir, task_file):
    res = runner.invoke(app, ["eval", "--model", str(toy_dir), "--task", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
    res = runner.invoke(app, ["eval", "--model", "no-such-model", "--task", str(task_file), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown model spec" in res.output
    res = runner.invoke(app, ["eval", "--model", str(toy_dir), "--task", str(task_file), "--metric", "bogus", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown metric 'bogus'" in res.output
    assert not (tmp_path / "results.json").exists()


def test_models_and_tasks_listing():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "smollm2-135m" in res.output
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0 and "ioi" in res.output
