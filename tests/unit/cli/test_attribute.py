"""`circuitlab attribute` on a toy native model saved to disk: every method writes results and figures."""

from __future__ import annotations

import json

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
    assert (out / "results.csv").is_file() and (out / "report.html").is_file()
    if method == "dla":
        assert result.summary["relative_error"] < 1e-4  # DLA's own runtime check allows 1e-3; float32 gives ~1e-6
    if method == "ig":
        assert result.params["steps"] == 8 and result.params["baseline"] == "auto"  # what was asked ...
        assert result.summary["baseline"] == "corrupt"  # ... and what ran: auto with a corrupt prompt
    # a second run into the same --out is refused unless --force, which replaces it whole
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output


def test_attribute_single_prompt(tmp_path, toy_dir):
    out = tmp_path / "prompt"
    res = runner.invoke(app, ["attribute", "--method", "dla", "--model", str(toy_dir), "--prompt", PROMPT,
                              "--answer", " Mary", "--wrong", " John", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert load_results(out).task["metric"] == "logit_diff"
    res = runner.invoke(app, ["attribute", "--method", "ig", "--model", str(toy_dir), "--prompt", PROMPT,
                              "--answer", " Mary", "--out", str(tmp_path / "ig"), "--steps", "4"])
    assert res.exit_code == 0, res.output
    result = load_results(tmp_path / "ig")
    assert result.summary["baseline"] == "pad" and result.task["metric"] == "logprob"  # no corrupt, no wrong


def test_attribute_runs_every_token_length(tmp_path, toy_dir):
    """Prompts of two token lengths: every prompt is attributed (none silently dropped)."""
    rows = [
        {"clean": PROMPT, "corrupt": "When Tom and Anna went to the store , Paul gave a drink to",
         "answer": " Mary", "wrong": " John"},
        {"clean": "When Tom and Paul went to the store , Paul gave a drink to", "answer": " Tom", "wrong": " Paul",
         "corrupt": "When Mary and Anna went to the store , Kate gave a drink to"},
        {"clean": "Then Mary and John went to the store , John gave to", "answer": " Mary", "wrong": " John",
         "corrupt": "Then Tom and Anna went to the store , Paul gave to"},
    ]
    task = tmp_path / "two_lengths.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["attribute", "--method", "ig", "--model", str(toy_dir), "--task", str(task),
                              "--steps", "4", "--out", str(tmp_path / "ig")])
    assert res.exit_code == 0, res.output
    result = load_results(tmp_path / "ig")
    assert {r["prompt"] for r in result.records} == {0, 1, 2}
    assert result.summary["n_prompts"] == 3 and sorted(result.summary["token_lengths"]) == [13, 15]  # with BOS


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "saliency", "--task", "TASK"], "unknown attribution method"),
    (["--method", "dla"], "either --task"),
    (["--method", "dla", "--prompt", PROMPT], "either --task"),
    (["--method", "ig", "--task", "TASK", "--steps", "0"], "steps >= 1"),
    (["--method", "ig", "--task", "TASK", "--rule", "riemann_trapezoid", "--steps", "1"], "steps >= 2"),
    (["--method", "ig", "--task", "TASK", "--rule", "simpson"], "unknown integration rule 'simpson'"),
    (["--method", "ig", "--task", "TASK", "--baseline", "noise"], "unknown baseline 'noise'"),
    (["--method", "rollout", "--task", "TASK", "--index", "-1"], "index must be an integer >= 0"),
    (["--method", "atp", "--task", "TASK", "--sites", "bogus"], "unknown attribution-patching site 'bogus'"),
    (["--method", "atp", "--task", "TASK", "--sites", "z,z"], "more than once"),
    (["--method", "atp", "--task", "TASK", "--direction", "denoising"], "unknown direction 'denoising'"),
    (["--method", "rollout", "--task", "TASK", "--bos", "drop"], "unknown bos choice 'drop'"),
])
def test_attribute_bad_input_fails_before_the_model_loads(tmp_path, task_file, args, message):
    """Each bad option is refused before loading: the model path does not even exist."""
    args = [str(task_file) if a == "TASK" else a for a in args]
    res = runner.invoke(app, ["attribute", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "bad"), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args", [
    ["--method", "atp", "--prompt", PROMPT, "--answer", " Mary", "--wrong", " John"],
    ["--method", "ig", "--prompt", PROMPT, "--answer", " Mary", "--baseline", "corrupt"],
])
def test_attribute_missing_corruption_is_refused(tmp_path, toy_dir, args):
    res = runner.invoke(app, ["attribute", "--model", str(toy_dir), "--out", str(tmp_path / "bad"), *args])
    assert res.exit_code == 2
    assert "needs a corrupt prompt" in " ".join(res.output.split())
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "rollout", "--index", "7"], "prompt index 7 out of range"),
    (["--method", "ig", "--hook", "blocks.9.hook_resid_pre"], "does not exist"),
])
def test_attribute_bad_input_needing_the_model(tmp_path, toy_dir, task_file, args, message):
    res = runner.invoke(app, ["attribute", "--model", str(toy_dir), "--task", str(task_file),
                              "--out", str(tmp_path / "bad"), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "bad").exists()


def test_attribute_atp_head_sites(tmp_path, toy_dir, task_file):
    out = tmp_path / "atp"
    res = runner.invoke(app, ["attribute", "--method", "atp", "--model", str(toy_dir), "--task", str(task_file),
                              "--sites", "q,v,pattern", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {r["site"] for r in load_results(out).records} == {"q", "v", "pattern"}
    assert (out / "atp_q_heads.png").is_file() and (out / "atp_pattern_heads.png").is_file()


@pytest.mark.parametrize("direction, base", [("denoise", 0.0), ("noise", 1.0)])
def test_attribute_atp_direction(tmp_path, toy_dir, task_file, direction, base):
    out = tmp_path / direction
    res = runner.invoke(app, ["attribute", "--method", "atp", "--model", str(toy_dir), "--task", str(task_file),
                              "--sites", "z", "--direction", direction, "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.params["direction"] == direction and result.summary["direction"] == direction
    values = [r["value"] for r in result.records]
    # Each cell is the normalised value of one patch: near the unpatched run's (0 denoising, 1 noising).
    assert abs(sum(values) / len(values) - base) < 0.5


@pytest.mark.parametrize("method", ["rollout", "flow"])
def test_attribute_rollout_bos(tmp_path, toy_dir, task_file, method):
    for bos, first in (("auto", 1), ("include", 0)):
        out = tmp_path / f"{method}-{bos}"
        res = runner.invoke(app, ["attribute", "--method", method, "--model", str(toy_dir), "--task", str(task_file),
                                  "--bos", bos, "--out", str(out)])
        assert res.exit_code == 0, res.output
        result = load_results(out)
        assert result.summary["bos"] == ("exclude" if bos == "auto" else "include")
        assert min(r["pos"] for r in result.records) == first
        assert ("raw" in result.records[0]) == (method == "flow")


def test_ig_completeness_gap_is_said_loudly(tmp_path, toy_dir):
    """A --prompt without --corrupt: auto falls back to pad; with 2 Riemann steps completeness fails on the
    toy, which the summary records and stderr says, naming the fix."""
    out = tmp_path / "ig"
    res = runner.invoke(app, ["attribute", "--method", "ig", "--model", str(toy_dir), "--prompt", PROMPT,
                              "--answer", " Mary", "--steps", "2", "--rule", "riemann_left", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = load_results(out).summary
    assert summary["baseline"] == "pad" and summary["baseline_requested"] == "auto"
    assert summary["max_relative_gap"] > 0.01 and summary["completeness_ok"] is False
    text = " ".join(res.output.split())
    assert "warning: integrated gradients misses completeness" in text and "pass --corrupt" in text
    assert "fell back to pad" in summary["warning"]
