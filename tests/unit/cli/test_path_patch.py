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
    assert result.command == "path-patch" and result.params["receivers"] == "a1.h*<q>"
    assert result.artifacts == ["path_patching.png", "path_patching.heatmap.json"] and (out / "path_patching.png").is_file()
    assert (out / "report.html").is_file()


def test_reusing_out_needs_force(tmp_path, toy_dir, task_file):
    out = tmp_path / "pp"
    args = ["path-patch", "--model", str(toy_dir), "--task", str(task_file), "--receivers", "logits", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    assert load_results(out).params["receivers"] == "logits"


def test_path_patch_unknown_receiver_names_the_range(tmp_path, toy_dir, task_file):
    res = runner.invoke(app, ["path-patch", "--model", str(toy_dir), "--task", str(task_file),
                              "--receivers", "a7.h0<q>", "--out", str(tmp_path / "pp")])
    assert res.exit_code == 2 and "a7.h0" in res.output and "layers 0..1" in res.output
    assert not (tmp_path / "pp").exists()  # nothing written for a failed run


def test_receiver_typo_fails_before_the_model_loads(tmp_path, task_file):
    # The model path does not exist: had the model been loaded first, the error would be about it.
    res = runner.invoke(app, ["path-patch", "--model", str(tmp_path / "no-such-model"), "--task", str(task_file),
                              "--receivers", "a9.h1<x>", "--out", str(tmp_path / "pp")])
    assert res.exit_code == 2 and "not well formed" in res.output and "no-such-model" not in res.output


def test_method_and_max_batch_options(tmp_path, toy_dir, task_file, toy):
    """--method masked runs the reference, --method auto (any --max-batch) the self-checked fast path: the
    same numbers up to float32 rounding (64 eps of the largest logit, as tests/unit/graph/test_direct_paths
    `tol`); a bad method fails before the model loads."""
    import torch

    base = ["path-patch", "--model", str(toy_dir), "--task", str(task_file), "--receivers", "logits"]
    runs = {}
    for method, max_batch in (("auto", "2"), ("masked", "256")):
        out = tmp_path / method
        res = runner.invoke(app, [*base, "--method", method, "--max-batch", max_batch, "--out", str(out)])
        assert res.exit_code == 0, res.output
        runs[method] = load_results(out)
    auto, masked = runs["auto"], runs["masked"]
    assert auto.params["method"] == "auto" and auto.params["max_batch"] == 2 and masked.params["method"] == "masked"
    assert auto.summary["method"] != masked.summary["method"]
    got = torch.tensor([r["metric"] for r in auto.records if r["metric"] is not None])
    want = torch.tensor([r["metric"] for r in masked.records if r["metric"] is not None])
    with torch.no_grad():
        scale = float(toy.bridge(toy.to_tokens(IOI_CLEAN)).abs().max())
    tol = 64 * torch.finfo(torch.float32).eps * scale
    assert len(got) == len(want) == len(auto.records) == toy.n_layers * (toy.n_heads + 1) + 1  # every sender
    assert (want - masked.summary["clean_metric"]).abs().max() > 10 * tol  # the patches do something
    assert (got - want).abs().max() < tol
    bad = runner.invoke(app, [*base[:1], "--model", str(tmp_path / "no-such-model"), *base[3:], "--method", "fast",
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "method" in bad.output and "no-such-model" not in bad.output


IOI_CLEAN = ["When Mary and John went to the store , John gave a drink to",
             "When John and Mary went to the store , Mary gave a drink to"]
