"""`circuitlab path-patch` on the toy model saved to disk."""

from __future__ import annotations

from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()


def test_path_patch_writes_layer_by_head_records(tmp_path, toy_dir, task_file, toy):
    out = tmp_path / "pp"
    res = runner.invoke(app, ["path-patch", "--model", str(toy_dir), "--task", str(task_file),
                              "--receivers", "a1.h*<q>", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    measured = {(r["layer"], r["head"]) for r in result.records if r["normalised"] is not None}
    assert measured == {(0, h) for h in range(toy.n_heads)}  # only layer-0 heads feed layer-1 queries
    assert len(result.records) == toy.n_layers * toy.n_heads  # the full grid; cells with no edge are null
    assert (out / "report.html").is_file() and any(p.suffix == ".png" for p in out.iterdir())


def test_path_patch_unknown_receiver_is_clear(tmp_path, toy_dir, task_file):
    res = runner.invoke(app, ["path-patch", "--model", str(toy_dir), "--task", str(task_file),
                              "--receivers", "a7.h0<q>", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "a7.h0" in res.output
