"""`circuitlab patch` on a toy native model saved to disk: results.json records, heatmaps, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()


@pytest.fixture(scope="module")
def short_task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "names.jsonl"
    rows = [
        {"clean": "When Mary and John went , John gave a drink to", "corrupt": "When Tom and Anna went , Paul gave a drink to", "answer": " Mary", "wrong": " John"},
        {"clean": "When John and Mary went , Mary gave a drink to", "corrupt": "When Tom and Anna went , Paul gave a drink to", "answer": " John", "wrong": " Mary"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_patch_writes_records_and_heatmap(tmp_path, toy_dir, short_task_file):
    out = tmp_path / "out"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--site", "resid_pre",
                              "--by", "layer,pos", "--direction", "denoise", "--max-batch", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "patch" and len(result.records) == 2 * 12
    assert {"site", "layer", "pos", "head", "value"} <= result.records[0].keys()
    layer0_bos = next(r for r in result.records if r["layer"] == 0 and r["pos"] == 0)
    assert layer0_bos["value"] == pytest.approx(0.0, abs=1e-6)  # BOS is identical in clean and corrupt
    assert (out / "heatmap_resid_pre_layer_pos.png").stat().st_size > 1000


def test_patch_heads_noising(tmp_path, toy_dir, short_task_file):
    out = tmp_path / "heads"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--site", "z",
                              "--by", "layer,head", "--direction", "noise", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(load_results(out).records) == 2 * 4
    assert (out / "heatmap_z_layer_head.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--site", "resid_middle"], "unknown patching site"),
    (["--site", "resid_pre", "--by", "layer,head"], "has no heads"),
    (["--direction", "up"], "unknown direction"),
])
def test_patch_bad_input(tmp_path, toy_dir, short_task_file, args, message):
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
