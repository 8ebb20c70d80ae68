"""`circuitlab report DIR` on runs made by the CLI."""

from __future__ import annotations

from typer.testing import CliRunner

from circuitlab.cli import app

runner = CliRunner()


def test_report_over_two_runs(tmp_path, toy_dir, task_file):
    for site in ("resid_pre", "z"):
        by = "layer,pos" if site == "resid_pre" else "layer,head"
        res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(task_file), "--site", site,
                                  "--by", by, "--out", str(tmp_path / "runs" / site)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(tmp_path / "runs")])
    assert res.exit_code == 0 and "(2 runs)" in res.output, res.output
    page = (tmp_path / "runs" / "circuitlab-report.html").read_text()
    assert page.count("<svg class=heatmap") == 2  # each patching heatmap with hover values


def test_report_bad_inputs_are_one_line_errors(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a folder" in res.output
    (tmp_path / "x.html").write_text("mine")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "--force" in res.output and (tmp_path / "x.html").read_text() == "mine"
