"""`circuitlab attribute` on a toy native model saved to disk: every method writes results and figures."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.results import load_results

runner = CliRunner()
PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.mark.parametrize(("method", "figure"), [
    ("dla", "dla_heads.png"), ("ig", "ig_tokens.png"), ("rollout", "rollout.png"), ("flow", "flow.png"),
    ("attn-grad", "attn_grad_heads.png"), ("atp", "atp_heads.png"),
])
def test_attribute_methods_write_results(tmp_path, toy_dir, task_file, method, figure):
    out = tmp_path / method
    args = ["attribute", "--method", method, "--model", str(toy_dir), "--task", str(task_file), "--out", str(out),
            "--steps", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == f"attribute/{method}"
    assert result.records and (out / figure).is_file() and figure in result.artifacts
    assert (out / "results.csv").is_file()
    if method == "dla":
        assert result.summary["relative_error"] < 1e-4
    if method == "ig":
        assert result.params["steps"] == 8 and result.params["baseline"] == "corrupt"  # auto with a corrupt prompt


def test_attribute_single_prompt(tmp_path, toy_dir):
    out = tmp_path / "prompt"
    res = runner.invoke(app, ["attribute", "--method", "dla", "--model", str(toy_dir), "--prompt", PROMPT,
                              "--answer", " Mary", "--wrong", " John", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert load_results(out).task["metric"] == "logit_diff"
    res = runner.invoke(app, ["attribute", "--method", "ig", "--model", str(toy_dir), "--prompt", PROMPT,
                              "--answer", " Mary", "--out", str(out / "ig"), "--steps", "4"])
    assert res.exit_code == 0, res.output
    result = load_results(out / "ig")
    assert result.params["baseline"] == "pad" and result.task["metric"] == "logprob"  # no corrupt, no wrong


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "saliency", "--task", "TASK"], "unknown attribution method"),
    (["--method", "dla"], "either --task"),
    (["--method", "dla", "--prompt", PROMPT], "either --task"),
    (["--method", "atp", "--prompt", PROMPT, "--answer", " Mary", "--wrong", " John"], "needs a corrupt prompt"),
    (["--method", "ig", "--task", "TASK", "--steps", "0"], "steps"),
    (["--method", "ig", "--task", "TASK", "--baseline", "noise"], "unknown baseline"),
])
def test_attribute_bad_input(tmp_path, toy_dir, task_file, args, message):
    args = [str(task_file) if a == "TASK" else a for a in args]
    res = runner.invoke(app, ["attribute", "--model", str(toy_dir), "--out", str(tmp_path / "bad"), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_attribute_atp_head_sites(tmp_path, toy_dir, task_file):
    out = tmp_path / "atp"
    res = runner.invoke(app, ["attribute", "--method", "atp", "--model", str(toy_dir), "--task", str(task_file),
                              "--sites", "q,v,pattern", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {r["site"] for r in load_results(out).records} == {"q", "v", "pattern"}
    assert (out / "atp_q_heads.png").is_file() and (out / "atp_pattern_heads.png").is_file()
    res = runner.invoke(app, ["attribute", "--method", "atp", "--model", str(toy_dir), "--task", str(task_file),
                              "--sites", "bogus", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "unknown attribution-patching site 'bogus'" in res.output
