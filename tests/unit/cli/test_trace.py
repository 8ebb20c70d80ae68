"""`circuitlab trace` on a toy native model saved to disk: one prompt, a task average, bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.patching.causal_trace import TOKEN_GROUPS
from circuitlab.results import load_results
from circuitlab.tasks.task import Example, Task

PROMPT, SUBJECT, TARGET = "The capital of France is in", "capital of France", "Paris"
runner = CliRunner()


def _trace(toy_dir, out, *args: str):
    return runner.invoke(app, ["trace", "--model", str(toy_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--target",
                               TARGET, "--out", str(out), *args])


def test_cli_trace(tmp_path, toy_dir):
    out = tmp_path / "trace"
    res = _trace(toy_dir, out, "--kind", "all", "--samples", "2", "--window", "2", "--seed", "3")
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "trace" and result.summary["subject_span"] == [2, 5]
    assert result.summary["subject_tokens"] == ["capital", "of", "France"]
    assert result.params == {"prompt": PROMPT, "subject": SUBJECT, "target": TARGET, "kind": "all", "samples": 2,
                             "noise": "subject", "noise_scale": 3.0, "window": 2, "seed": 3}
    # ROME's sigma by default, recorded: 3 x the std of the subject's token embeddings.
    assert result.summary["noise"] == "subject" and result.summary["noise_scale"] == 3.0
    assert result.summary["sigma"] == pytest.approx(3 * result.summary["noise_std"], rel=1e-12)
    assert result.seed == 3 and result.task is None
    assert {r["kind"] for r in result.records} == {"resid", "mlp", "attn"}
    assert len(result.records) == 3 * 7 * 2  # kinds x positions x layers
    pictures = ["trace_attn.png", "trace_mlp.png", "trace_resid.png"]
    assert [a for a in sorted(result.artifacts) if a.endswith(".png")] == pictures
    assert {a for a in result.artifacts if a.endswith(".heatmap.json")} == {p[:-4] + ".heatmap.json" for p in pictures}
    assert all((out / f"trace_{k}.png").stat().st_size > 1000 for k in ("resid", "mlp", "attn"))
    # The last layer's output at the last token restores the clean probability.
    last = next(r for r in result.records if r["kind"] == "resid" and r["layer"] == 1 and r["pos"] == 6)
    assert last["prob"] == pytest.approx(result.summary["clean_prob"], abs=1e-5)


def test_cli_trace_seed_draws_the_noise(tmp_path, toy_dir):
    probs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"seed{len(probs)}"
        res = _trace(toy_dir, out, "--kind", "resid", "--samples", "2", "--seed", seed)
        assert res.exit_code == 0, res.output
        probs.append(load_results(out).summary["corrupt_prob"])
    assert probs[0] == probs[1] != probs[2]


@pytest.mark.parametrize("args, message", [
    (["--subject", "Berlin", "--target", TARGET], "does not occur in the prompt"),
    (["--subject", SUBJECT, "--target", TARGET, "--kind", "heads"], "unknown trace kind 'heads'"),
    (["--subject", SUBJECT, "--target", TARGET, "--samples", "0"], "samples must be"),
    (["--subject", SUBJECT, "--target", TARGET, "--window", "0"], "window must be"),
    (["--subject", SUBJECT, "--target", TARGET, "--noise", "-1"], "noise must be"),
    (["--subject", SUBJECT, "--target", TARGET, "--noise", "gauss"], "noise must be 'subject' (ROME's), 'vocab' or a number"),
    (["--subject", SUBJECT, "--target", TARGET, "--noise", "0.5", "--noise-scale", "2"], "numeric --noise is sigma"),
    ([], "--subject"),
])
def test_bad_input_fails_before_the_model_loads(tmp_path, args, message):
    # A model spec that cannot load: the error must be about the options, found first.
    res = runner.invoke(app, ["trace", "--model", "no-such-model", "--prompt", PROMPT, *args, "--out",
                              str(tmp_path / "bad")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("noise, source", [("vocab", "vocab"), ("0.25", "absolute")])
def test_cli_trace_noise_choices(tmp_path, toy_dir, noise, source):
    out = tmp_path / source
    res = _trace(toy_dir, out, "--kind", "resid", "--samples", "1", "--noise", noise)
    assert res.exit_code == 0, res.output
    summary = load_results(out).summary
    assert summary["noise"] == source and (summary["sigma"] == 0.25 if source == "absolute" else summary["sigma"] > 0)
    assert "sigma" in res.output  # printed with the summary


def test_target_must_be_one_token(tmp_path, toy_dir):
    res = runner.invoke(app, ["trace", "--model", str(toy_dir), "--prompt", PROMPT, "--subject", SUBJECT,
                              "--target", "Paris France", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "single token" in " ".join(res.output.split())


@pytest.fixture
def toy_facts():
    from circuitlab.tasks.registry import GENERATORS, register_task

    @register_task("toy_facts_for_test", "two fact prompts for the toy vocabulary")
    def _facts(model, n=2, seed=0):
        rows = [(PROMPT, SUBJECT, "Paris"), ("Paris is the capital of", "Paris", "France")][:n]
        return Task("toy_facts_for_test", [Example(p, p, [a], meta={"subject": s}) for p, s, a in rows], metric="prob")

    yield "toy_facts_for_test"
    GENERATORS.pop("toy_facts_for_test", None)


def test_cli_trace_task_average(tmp_path, toy_dir, toy_facts):
    out = tmp_path / "aie"
    res = runner.invoke(app, ["trace", "--model", str(toy_dir), "--task", toy_facts, "--kind", "resid",
                              "--samples", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.command == "trace/average" and result.task["n"] == 2 and result.summary["n_prompts"] == 2
    assert {r["group"] for r in result.records} == set(TOKEN_GROUPS)
    assert result.artifacts == ["aie_resid.png", "aie_resid.heatmap.json"]
    assert (out / "aie_resid.png").stat().st_size > 1000
    assert result.summary["aggregate"] == "token" and result.summary["noise"] == "subject"
    res = runner.invoke(app, ["trace", "--model", str(toy_dir), "--task", toy_facts, "--kind", "resid",
                              "--samples", "2", "--aggregate", "prompt", "--out", str(tmp_path / "by_prompt")])
    assert res.exit_code == 0, res.output
    by_prompt = load_results(tmp_path / "by_prompt")
    assert by_prompt.params["aggregate"] == "prompt" and by_prompt.summary["sigma"] == result.summary["sigma"]
    res = runner.invoke(app, ["trace", "--model", "no-such-model", "--task", toy_facts, "--aggregate", "layer",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "unknown aggregate 'layer'" in res.output


def test_cli_trace_task_without_subjects(tmp_path, toy_dir, task_file):
    res = runner.invoke(app, ["trace", "--model", str(toy_dir), "--task", str(task_file), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "meta['subject']" in " ".join(res.output.split())
