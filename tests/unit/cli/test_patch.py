"""`circuitlab patch` on a toy native model saved to disk: results.json records, heatmaps, reusing --out,
bad input."""

from __future__ import annotations

import json

import pytest
import torch
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
    # BOS is identical in clean and corrupt: the cell is skipped and its value is the baseline itself, so it is
    # 0 up to the float32 rounding of (mean - corrupt mean) / (clean mean - corrupt mean): a few eps of the
    # corrupt mean over the gap.
    clean, corrupt = result.summary["clean_mean"], result.summary["corrupt_mean"]
    rounding = 8 * torch.finfo(torch.float32).eps * max(1.0, abs(corrupt)) / abs(clean - corrupt)
    assert layer0_bos["value"] == pytest.approx(0.0, abs=rounding)
    assert max(abs(r["value"]) for r in result.records) > 1e-2  # other cells do move the metric
    assert (out / "heatmap_resid_pre_layer_pos.png").stat().st_size > 1000
    assert sorted(result.artifacts) == ["heatmap_resid_pre_layer_pos.heatmap.json", "heatmap_resid_pre_layer_pos.png",
                                        "patching.json"]
    assert result.params["by"] == "layer,pos" and result.params["max_batch"] == 5


def test_patch_heads_noising(tmp_path, toy_dir, short_task_file):
    out = tmp_path / "heads"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--site", "z",
                              "--by", "layer,head", "--direction", "noise", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(load_results(out).records) == 2 * 4
    assert (out / "heatmap_z_layer_head.png").exists()


def test_patch_by_layer_heatmap_is_named_for_what_it_shows(tmp_path, toy_dir, short_task_file):
    out = tmp_path / "layers"
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--site", "attn_out",
                              "--by", "layer", "--per-prompt", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert len(result.records) == 2 * 2 and {r["prompt"] for r in result.records} == {0, 1}  # layers x prompts
    assert (out / "heatmap_attn_out_layer.png").stat().st_size > 1000
    assert not (out / "heatmap_attn_out_layer_pos.png").exists()


def test_second_run_into_the_same_out_needs_force(tmp_path, toy_dir, short_task_file):
    out = tmp_path / "reuse"
    base = ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--out", str(out)]
    assert runner.invoke(app, [*base, "--site", "resid_pre"]).exit_code == 0
    first = (out / "results.json").read_text()
    res = runner.invoke(app, [*base, "--site", "z", "--by", "layer,head"])
    assert res.exit_code == 2 and "--force" in " ".join(res.output.split())
    assert (out / "results.json").read_text() == first  # the first run is intact, nothing of the second
    assert sorted(p.name for p in out.glob("*.png")) == ["heatmap_resid_pre_layer_pos.png"]
    res = runner.invoke(app, [*base, "--site", "z", "--by", "layer,head", "--force"])
    assert res.exit_code == 0, res.output
    assert load_results(out).params["site"] == "z"
    # Replaced whole: the first run's heatmap is gone, so the report cannot show it.
    assert sorted(p.name for p in out.glob("*.png")) == ["heatmap_z_layer_head.png"]


@pytest.mark.parametrize("args,message", [
    (["--site", "resid_middle"], "unknown patching site"),
    (["--site", "resid_pre", "--by", "layer,head"], "has no heads"),
    (["--direction", "up"], "unknown direction"),
    (["--by", "pos"], "unsupported granularity"),
    (["--max-batch", "0"], "max_batch must be"),
])
def test_patch_bad_input(tmp_path, toy_dir, short_task_file, args, message):
    res = runner.invoke(app, ["patch", "--model", str(toy_dir), "--task", str(short_task_file), "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_patch_bad_option_fails_before_the_model_loads(tmp_path, short_task_file):
    res = runner.invoke(app, ["patch", "--model", "no-such-model", "--task", str(short_task_file), "--site", "zz",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown patching site 'zz'" in " ".join(res.output.split())

