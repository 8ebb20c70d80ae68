"""`circuitlab heads` on a toy native model saved to disk."""

from __future__ import annotations

from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()


def test_heads_writes_tables_heatmaps_and_composition(tmp_path, toy_dir, task_file):
    out = tmp_path / "heads"
    res = runner.invoke(app, ["heads", "--model", str(toy_dir), "--task", str(task_file), "--n-repeat-tokens", "6",
                              "--n-sequences", "2", "--top", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "top 3 heads by induction" in res.output and "k_partner" in res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    result = load_results(out)
    assert result.command == "heads" and result.params["n_repeat_tokens"] == 6
    for name in ("heads_induction.png", "heads_bos.png", "composition_k.png", "composition.csv"):
        assert (out / name).is_file() and name in result.artifacts
    assert (out / "report.html").is_file()


def test_heads_rejects_bad_options_before_loading(tmp_path, no_model_load):
    res = runner.invoke(app, ["heads", "--n-repeat-tokens", "0", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "n_repeat_tokens" in res.output
