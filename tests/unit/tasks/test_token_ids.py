"""Models without a tokenizer (and with fewer outputs than inputs, as compiled models have): tasks given as
token ids run through every command; `--metric output:K` scores a model whose output is a number."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from circuitlab.cli import app
from circuitlab.errors import MetricError, TaskError
from circuitlab.models.loading import load_model, load_native, save_native
from circuitlab.models.toy import toy_config
from circuitlab.results import load_results
from circuitlab.runner import run
from circuitlab.tasks.files import load_task_file

runner = CliRunner()
D_VOCAB, D_VOCAB_OUT = 12, 6
ROWS = [{"clean_ids": [3, 7, 11, 2], "corrupt_ids": [3, 9, 10, 2], "answer_ids": [4], "wrong_ids": [5]},
        {"clean_ids": [8, 7, 11, 1], "corrupt_ids": [8, 9, 10, 1], "answer_ids": [1], "wrong_ids": [0]}]


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory):
    """A tokenizer-less model dir whose output vocabulary (6) is smaller than its input one (12)."""
    model = load_native(dict(toy_config(d_vocab=D_VOCAB, n_layers=2, seed=4), d_vocab_out=D_VOCAB_OUT))
    return save_native(model, tmp_path_factory.mktemp("compiled") / "model")


def _task(tmp_path, rows, name="ids.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ids_are_used_as_given(compiled_dir, tmp_path):
    model = load_model(compiled_dir)
    assert model.tokenizer is None and (model.d_vocab, model.d_vocab_out) == (D_VOCAB, D_VOCAB_OUT)
    batch = load_task_file(_task(tmp_path, ROWS)).prepare(model).single_batch()
    assert batch.clean.tolist() == [r["clean_ids"] for r in ROWS]  # no BOS prepended
    assert batch.answers.tolist() == [[4], [1]] and batch.wrong.tolist() == [[5], [0]]


@pytest.mark.parametrize("command", [["eval"], ["patch", "--site", "resid_pre", "--by", "layer,pos"],
                                     ["patch", "--site", "z", "--by", "layer,head"],
                                     ["path-patch", "--receivers", "logits"], ["attribute", "--method", "dla"]],
                         ids=lambda c: " ".join(c))
def test_every_command_runs_an_id_task_on_a_tokenizerless_model(compiled_dir, tmp_path, command):
    out = tmp_path / "out"
    res = runner.invoke(app, [*command, "--model", str(compiled_dir), "--task", str(_task(tmp_path, ROWS)),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    assert result.task["n"] == 2 and result.model["d_vocab_out"] == D_VOCAB_OUT
    numbers = [v for r in result.records for v in r.values() if isinstance(v, float)]
    assert numbers and all(v == v for v in numbers)  # finite numbers, no NaN (null) cells


def test_answer_id_beyond_the_output_vocabulary_is_a_task_error(compiled_dir, tmp_path):
    rows = [dict(ROWS[0], answer_ids=[D_VOCAB_OUT])]  # a valid input id, but the logits are 6 wide
    res = runner.invoke(app, ["eval", "--model", str(compiled_dir), "--task", str(_task(tmp_path, rows)),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "answer token id 6 is outside" in res.output and "output vocabulary" in res.output
    model = load_model(compiled_dir)
    with pytest.raises(TaskError, match=r"ids 0 to 5\)"):
        load_task_file(_task(tmp_path, rows)).prepare(model)


def test_output_metric_is_the_raw_output_at_the_answer_position(compiled_dir, tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("answer_ids", "wrong_ids")} for r in ROWS]  # no answers
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", "--model", str(compiled_dir), "--task", str(_task(tmp_path, rows)),
                              "--metric", "output:3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    model = load_model(compiled_dir)
    with torch.no_grad():
        clean = model.logits(torch.tensor([r["clean_ids"] for r in rows]))[:, -1, 3]
        corrupt = model.logits(torch.tensor([r["corrupt_ids"] for r in rows]))[:, -1, 3]
    assert [r["clean_metric"] for r in result.records] == pytest.approx(clean.tolist(), rel=0, abs=0)
    assert [r["corrupt_metric"] for r in result.records] == pytest.approx(corrupt.tolist(), rel=0, abs=0)
    assert result.task["metric"] == "output:3" and result.summary["accuracy"] is None  # no answers to rank


def test_output_metric_drives_patching(compiled_dir, tmp_path):
    """Patching every position of resid_pre at layer 0 restores the clean output exactly (normalised 1)."""
    done = run("patch", model=str(compiled_dir), task=str(_task(tmp_path, ROWS)), metric="output:0", site="resid_pre",
               by="layer")
    layer0 = next(r for r in done.result.records if r["layer"] == 0)
    clean, corrupt = done.result.summary["clean_mean"], done.result.summary["corrupt_mean"]
    assert done.result.summary["metric"] == "output:0" and abs(clean - corrupt) > 1e-3  # a real contrast
    # The patched run is the clean forward again, possibly batched differently: float32 kernels may round
    # differently, by a few eps32 relative to activations of order 1; 64 eps32 bounds that. The normalised
    # value divides that error by clean - corrupt.
    tol = 64 * torch.finfo(torch.float32).eps
    assert layer0["metric"] == pytest.approx(clean, rel=0, abs=tol)
    assert layer0["value"] == pytest.approx(1.0, rel=0, abs=tol / abs(clean - corrupt))


def test_output_metric_is_validated_before_the_model_loads(compiled_dir, tmp_path, no_model_load):
    task = _task(tmp_path, ROWS)
    for bad in ("output:-1", "output:", "output:one", "output:1.5"):
        with pytest.raises(MetricError, match="K a non-negative integer"):
            run("eval", model=str(compiled_dir), task=str(task), metric=bad)


def test_output_dimension_beyond_the_output_width_fails_once_loaded(compiled_dir, tmp_path):
    with pytest.raises(MetricError, match=r"output has 6 dimensions \(0 to 5\); choose K below 6"):
        run("eval", model=str(compiled_dir), task=str(_task(tmp_path, ROWS)), metric=f"output:{D_VOCAB_OUT}")
