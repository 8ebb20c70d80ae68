"""The ``lens`` analysis: options validated before any model loads, and the command line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.errors import LensError
from circuitlab.lens.analysis import LensParams
from circuitlab.results import load_results
from circuitlab.runner import get_analysis

PROMPT = "When Mary and John went to the store , John gave a drink to"
runner = CliRunner()


def test_registered_without_a_task():
    entry = get_analysis("lens")
    assert entry.task == "none" and entry.params is LensParams


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": PROMPT, "target": ""}, "the target is empty"),
    ({"prompt": PROMPT, "top_k": 0}, "top_k must be an integer >= 1"),
    ({"prompt": PROMPT, "top_k": 2.5}, "top_k must be an integer >= 1"),
])
def test_params_validate(options, message):
    with pytest.raises(LensError, match=message):
        LensParams(**options)


def test_cli_lens(tmp_path, toy, toy_dir):
    out = tmp_path / "lens"
    args = ["lens", "--model", str(toy_dir), "--prompt", PROMPT, "--target", "Mary", "--top-k", "3", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    result = load_results(out)
    n_pos = len(toy.to_tokens(PROMPT)[0])
    assert result.command == "lens" and len(result.records) == (toy.n_layers + 1) * n_pos
    assert result.params == {"prompt": PROMPT, "target": "Mary", "top_k": 3}
    assert (out / "lens.png").is_file() and result.artifacts == ["lens.png", "lens.heatmap.json"] and result.summary["target"] == "Mary"
    res = runner.invoke(app, args)  # the same --out again: refused without --force ...
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, [*args, "--force"])  # ... and replaced whole with it
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lens", "--model", str(toy_dir), "--prompt", PROMPT, "--target", "Mary John",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "single token" in " ".join(res.output.split())


def test_cli_lens_bad_top_k_fails_before_loading(tmp_path):
    res = runner.invoke(app, ["lens", "--model", str(tmp_path / "no-model"), "--top-k", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "top_k must be an integer >= 1" in " ".join(res.output.split())
