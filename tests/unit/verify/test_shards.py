"""`verify` over prompt shards (issue 16 §1): the local backend with resume=True runs the shards in this
process (Ray: tests/integration/runner/test_ray.py). Every record, summary number, bootstrap interval and
file equals the one-process run's; options that cannot shard exactly are refused before the model loads."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from typing import Any

import pytest
import torch

from circuitlab.errors import AnalysisError, VerifyError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.runner import run
from circuitlab.runner.executor import Executor, Fault
from circuitlab.runner.registry import get_analysis
from circuitlab.runner.shards import shard_directory, shard_key, split_task
from unit.runner.test_executor import names_task

# A shard batches its prompts differently, so each per-prompt value is the same float32 sum up to a few ulps
# of rounding; means, ratios and the percentiles of the same bootstrap resamples inherit that. 64 ulps of
# float32 (7.6e-6) relative to max(1, |value|), inside the 1e-5.
TOLERANCE = 64 * torch.finfo(torch.float32).eps
SHARDS = Executor(resume=True, shard_size=3)  # 7 prompts: shards of 3, 3 and 1


def assert_close(local: Any, sharded: Any, where: str = "") -> None:
    """Equal structure and text; floats equal to TOLERANCE (NaN matches NaN)."""
    if isinstance(local, dict):
        assert isinstance(sharded, dict) and local.keys() == sharded.keys(), where
        for key in local:
            assert_close(local[key], sharded[key], f"{where}.{key}")
    elif isinstance(local, list):
        assert isinstance(sharded, list) and len(local) == len(sharded), where
        for i, (a, b) in enumerate(zip(local, sharded, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(local, float) and not isinstance(sharded, bool):
        if math.isnan(local):
            assert math.isnan(sharded), where
        else:
            assert abs(local - sharded) <= TOLERANCE * max(1.0, abs(local)), (where, local, sharded)
    else:
        assert local == sharded, (where, local, sharded)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def csv_rows(text: str) -> list[dict[str, Any]]:
    return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def assert_same_verification(local: Any, sharded: Any) -> None:
    """Records, summary and every CSV file of two `verify` runs (`Run`s)."""
    assert_close(local.result.records, sharded.result.records, "records")
    assert_close(local.result.summary, sharded.result.summary, "summary")
    local_files, sharded_files = local.output.files(), sharded.output.files()
    assert local_files.keys() == sharded_files.keys()
    for name in local_files:
        a, b = csv_rows(local_files[name]), csv_rows(sharded_files[name])
        if name == "completeness.csv":  # sorted by gap: sets of (nearly) equal gaps may swap, so pair by set
            a, b = (sorted(rows, key=lambda r: str(r["nodes"])) for rows in (a, b))
        assert_close(a, b, name)


@pytest.fixture(scope="module")
def handset_files(handset, tmp_path_factory):
    """The hand-set model's true circuit without one edge (gaps and drops then differ between components),
    and the true circuit itself to compare with."""
    _, _, truth = handset
    folder = tmp_path_factory.mktemp("circuits")
    partial = truth.in_graph.clone()
    partial[truth.graph.edge_id("a0.h1->a1.h2<k>")] = False
    circuit = Circuit(truth.graph, partial).save(folder / "partial.json")
    return str(circuit), str(truth.save(folder / "truth.json"))


@pytest.fixture(scope="module")
def silent_task():
    """7 repeated-token prompts; the last (alone in the last shard) has corrupt == clean, so ablating changes
    nothing on it: that shard alone has m(full) = m(empty) and must not refuse (the whole task is fine)."""
    from circuitlab.discovery.ground_truth import load_ground_truth

    _, task, _ = load_ground_truth("handset-induction", n=7)
    examples = list(task.examples)
    examples[6] = dataclasses.replace(examples[6], corrupt_ids=examples[6].clean_ids)
    return dataclasses.replace(task, examples=examples)


@pytest.fixture(scope="module")
def toy_circuit(toy, tmp_path_factory):
    graph = Graph.from_model(toy)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1))
    return str(Circuit.top_n(graph, scores, 15).save(tmp_path_factory.mktemp("toy") / "circuit.json"))


def handset_options(handset_files: tuple[str, str]) -> dict[str, Any]:
    circuit, truth = handset_files
    # train = prompts 0-3: all of shard 0 and the first prompt of shard 1; the other split holds the silent one
    return {"circuit": circuit, "compare": truth, "split": "train", "per_edge": True, "greedy_steps": 0,
            "subsets": 3, "n_bootstrap": 200, "noise": (0.0, 0.1, 0.5)}


@pytest.fixture(scope="module")
def handset_local(handset, handset_files, silent_task):
    """The one-process run the sharded ones must equal."""
    return run("verify", model=handset[0], task=silent_task, **handset_options(handset_files))


def test_sharded_verify_equals_the_one_process_run_on_the_handset_model(handset, handset_files, silent_task,
                                                                        handset_local, tmp_path):
    model, local = handset[0], handset_local
    options = handset_options(handset_files)
    out = tmp_path / "out"
    sharded = run("verify", model=model, task=silent_task, out=out, executor=SHARDS, **options)
    assert_same_verification(local, sharded)
    summary = sharded.result.summary
    assert summary["n_prompts"] == 4 and summary["n_prompts_other_split"] == 3
    assert {"faithfulness_mean", "faithfulness_resample", "faithfulness_zero"} <= set(summary)
    assert summary["compare_other_inside"] == pytest.approx(1.0, abs=16 * torch.finfo(torch.float32).eps)
    assert not shard_directory(out).exists()


def test_merge_places_the_shards_in_task_order(handset, handset_files, silent_task, handset_local):
    """The merge itself, shard by shard: right order == one process; a wrong order is caught."""
    model = handset[0]
    entry = get_analysis("verify")
    assert entry.shard is not None
    params = entry.make_params({**handset_options(handset_files), "seed": 0})
    partials = [entry.shard.partial(model, shard, params) for shard in split_task(silent_task, 3)]
    assert [p.ends.shape[-1] for p in partials] == [3, 3, 1]
    local = handset_local.result.summary
    assert_close(local, entry.shard.merge(model, silent_task, partials, params).summary())
    # reversed, the silent prompt (KL 0: no edge changes anything on it) lands in the train split
    wrong = entry.shard.merge(model, silent_task, partials[::-1], params).summary()
    assert wrong["kl"] < 0.9 * local["kl"]


def test_sharded_verify_on_two_token_lengths_resumes_after_a_failing_shard(toy, toy_circuit, tmp_path):
    """The toy model on prompts of two token lengths (each shard re-groups them), the test half of a split
    cutting shard 1, the other ablations; shard 2 fails, the rerun resumes the saved shards."""
    task, out = names_task(7), tmp_path / "out"
    options = {"circuit": toy_circuit, "split": "test", "greedy_steps": 0, "subsets": 2, "n_bootstrap": 100,
               "noise": (0.0, 0.2)}
    failing = Executor(shard_size=3, resume=True, fault=Fault("raise-always", 2, str(tmp_path / "marker")))
    with pytest.raises(AnalysisError, match="shard 2 failed 2 times"):
        run("verify", model=toy, task=task, out=out, executor=failing, **options)
    assert len(list(shard_directory(out).iterdir())) == 2
    sharded = run("verify", model=toy, task=task, out=out, executor=SHARDS, **options)
    local = run("verify", model=toy, task=task, **options)
    assert_same_verification(local, sharded)
    assert sharded.result.summary["n_prompts"] == 3 and len(sharded.result.records) > 0


@pytest.mark.parametrize("options, message", [
    ({"greedy_steps": 2}, "--greedy-steps 0"),
    ({"greedy_steps": 0, "ablation": "mean"}, "--ablation corrupt or zero"),
    ({"greedy_steps": 0, "ablation": "resample"}, "--ablation corrupt or zero"),
])
def test_options_that_cannot_shard_exactly_are_refused_before_loading(no_model_load, handset_files, tmp_path,
                                                                      options, message):
    for executor in (Executor(resume=True), Executor(backend="ray")):
        with pytest.raises(VerifyError, match=message):
            run("verify", model="smollm2-135m", task="ioi", n=4, out=tmp_path / "out", executor=executor,
                circuit=handset_files[0], **options)


def test_a_rewritten_circuit_file_never_reuses_old_shards(handset, handset_files, tmp_path):
    """The circuit's content is part of the options (and so of every shard's key), and a file rewritten
    during a run is an error rather than a mix of two circuits."""
    model, task, _ = handset
    entry = get_analysis("verify")
    path = tmp_path / "circuit.json"
    path.write_bytes(open(handset_files[0], "rb").read())
    before = entry.make_params({"circuit": str(path), "greedy_steps": 0})
    path.write_bytes(open(handset_files[1], "rb").read())
    after = entry.make_params({"circuit": str(path), "greedy_steps": 0})
    assert before.circuit_sha256 != after.circuit_sha256
    with pytest.raises(AnalysisError, match="takes no option.*circuit_sha256"):  # derived, never an option
        entry.make_params({"circuit": str(path), "circuit_sha256": "0" * 64})
    shard = split_task(task, 3)[0]
    assert (shard_key("verify", "m", entry.params_record(before), shard)
            != shard_key("verify", "m", entry.params_record(after), shard))
    assert entry.shard is not None
    with pytest.raises(VerifyError, match="changed during the run"):
        entry.shard.partial(model, shard, before)


def test_cli_verify_takes_the_distribution_options(tmp_path, toy_dir, task_file, toy_circuit):
    from typer.testing import CliRunner

    from circuitlab.cli import app
    from circuitlab.results import load_results

    base = ["verify", "--model", str(toy_dir), "--task", str(task_file), "--circuit", toy_circuit,
            "--out", str(tmp_path / "v"), "--n-bootstrap", "50", "--subsets", "1", "--noise", "0,0.2",
            "--resume", "--shard-size", "1"]
    refused = CliRunner().invoke(app, base)  # the default greedy completeness search cannot shard
    assert refused.exit_code == 2 and "--greedy-steps 0" in refused.output, refused.output
    done = CliRunner().invoke(app, [*base, "--greedy-steps", "0"])
    assert done.exit_code == 0, done.output
    assert load_results(tmp_path / "v").summary["n_prompts"] == 2
