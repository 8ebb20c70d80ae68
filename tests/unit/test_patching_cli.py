"""`circuitlab patch` on a toy native model saved to disk: results.json records, heatmaps, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.models.loading import save_native
from circuitlab.models.toy import toy_config
from circuitlab.results import load_results

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory, toy):
    path = tmp_path_factory.mktemp("toy") / "model"
    save_native(toy, path, toy_config(d_vocab=len(toy.tokenizer), seed=0))
    return path


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "names.jsonl"
    rows = [
        {"clean": "When Mary and John went , John gave a drink to", "corrupt": "When Tom and Anna went , Paul gave a drink to", "answer": " Mary", "wrong": " John"},
        {"clean": "When John and Mary went , Mary gave a drink to", "corrupt": "When Tom and Anna went , Paul gave a drink to", "answer": " John", "wrong": " Mary"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_patch_writes_records_and_heatmap(tmp_path, toy_dir, task_file):
    out = tmp_path / "out"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(task_file), "--site", "resid_pre",
                              "--by", "layer,pos", "--direction", "denoise", "--max-batch", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "patch" and len(result.records) == 2 * 12
    assert {"site", "layer", "pos", "head", "value"} <= result.records[0].keys()
    layer0_bos = next(r for r in result.records if r["layer"] == 0 and r["pos"] == 0)
    assert layer0_bos["value"] == pytest.approx(0.0, abs=1e-6)  # BOS is identical in clean and corrupt
    assert (out / "heatmap_resid_pre_layer_pos.png").stat().st_size > 1000


def test_patch_heads_noising(tmp_path, toy_dir, task_file):
    out = tmp_path / "heads"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(task_file), "--site", "z",
                              "--by", "layer,head", "--direction", "noise", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(load_results(out).records) == 2 * 4
    assert (out / "heatmap_z_layer_head.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--site", "resid_middle"], "unknown patching site"),
    (["--site", "resid_pre", "--by", "layer,head"], "has no heads"),
    (["--direction", "up"], "unknown direction"),
])
def test_patch_bad_input(tmp_path, toy_dir, task_file, args, message):
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
