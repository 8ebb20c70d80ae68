"""`Executor` and prompt shards without Ray: options checked before loading, sharded runs equal to the
one-process run, failures named, resume after a failure (the Ray backend: tests/integration/runner)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from circuitlab.errors import AnalysisError, CircuitlabError
from circuitlab.runner import run
from circuitlab.runner.executor import Executor, Fault
from circuitlab.runner.registry import get_analysis
from circuitlab.runner.shards import ShardStore, shard_directory, shard_key, split_task
from circuitlab.tasks import Example, Task

# Shards re-batch prompts and merge means of shard sums: float32 rounding, a few ulps of values near 1.
TOLERANCE = 64 * torch.finfo(torch.float32).eps


def names_task(n: int = 7) -> Task:
    """IOI-like pairs in the toy vocabulary, every third one token longer (two token-length groups)."""
    names = ["Mary", "John", "Tom", "Anna", "Paul", "Kate"]
    examples = []
    for a, b in itertools.islice(itertools.permutations(names, 2), n):
        c, d = [x for x in names if x not in (a, b)][:2]
        lead = "Then when" if len(examples) % 3 == 2 else "When"
        examples.append(Example(f"{lead} {a} and {b} went to the store , {b} gave a drink to",
                                f"{lead} {c} and {d} went to the store , {c} gave a drink to", f" {a}", f" {b}"))
    return Task("names", examples)


def assert_same_records(local: list[dict], sharded: list[dict]) -> None:
    assert len(local) == len(sharded)
    if local and "edge" in local[0]:  # edges come strongest first: near-ties may swap by a rounding, so pair by name
        local, sharded = (sorted(rows, key=lambda r: r["edge"]) for rows in (local, sharded))
        for row in (*local, *sharded):
            row.pop("edge_index", None)  # the position in the strength order, not a value
    for a, b in zip(local, sharded, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float) and not math.isnan(value):
                assert abs(value - b[key]) <= TOLERANCE * max(1.0, abs(value)), (key, a, b)
            else:
                assert value == b[key] or (value != value and b[key] != b[key]), (key, a, b)


@pytest.mark.parametrize("options, message", [
    (dict(backend="slurm"), "choose local or ray"),
    (dict(workers=0), "workers must be"),
    (dict(shard_size=True), "shard-size must be"),
    (dict(address="auto"), "needs --backend ray"),
    (dict(backend="ray", address="nohost"), "HOST:PORT"),
    (dict(fault=Fault("melt", 0, "x")), "unknown fault"),
])
def test_bad_executor_options(options, message):
    with pytest.raises(AnalysisError, match=message):
        Executor(**options)


@pytest.mark.parametrize("analysis, options, executor, message", [
    ("eval", {}, Executor(backend="ray"), "ones that do: .*patch"),
    ("discover/eap", {"ablation": "mean", "top_n": 3}, Executor(backend="ray"), "ablation mean"),
    ("patch", {}, Executor(resume=True), "--resume needs --out"),
])
def test_unshardable_runs_fail_before_the_model_loads(no_model_load, toy_dir, analysis, options, executor, message):
    with pytest.raises(CircuitlabError, match=message):
        run(analysis, model=str(toy_dir), task=names_task(), executor=executor, **options)


def test_shards_keep_task_order_and_keys_name_their_inputs():
    task = names_task(7)
    shards = split_task(task, 3)
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [e for s in shards for e in s.examples] == task.examples
    key = shard_key("patch", "m", {"site": "z"}, shards[0])
    assert key == shard_key("patch", "m", {"site": "z"}, split_task(names_task(7), 3)[0])
    assert key != shard_key("patch", "m", {"site": "v"}, shards[0])
    assert key != shard_key("patch", "m", {"site": "z"}, shards[1])
    assert key != shard_key("patch", "other", {"site": "z"}, shards[0])


@pytest.mark.parametrize("analysis, options", [
    ("patch", {"site": "z", "by": "layer,head", "per_prompt": True}),
    ("attribute/dla", {}),
    ("attribute/ig", {"steps": 4}),
    ("discover/eap", {"top_n": 5, "curve": False}),
    ("discover/eap-ig", {"steps": 2, "top_n": 5, "curve": False}),
])
def test_sharded_run_equals_the_one_process_run(toy, tmp_path, analysis, options):
    task = names_task(7)
    local = run(analysis, model=toy, task=task, **options)
    out = tmp_path / "out"
    sharded = run(analysis, model=toy, task=task, out=out, executor=Executor(resume=True, shard_size=3), **options)
    assert_same_records(local.result.records, sharded.result.records)
    assert sharded.result.summary.get("n_prompts", 7) == 7
    # the summary too: token-length groups span shards (7 prompts of two lengths in shards of 3)
    cost = {"timing_s", "forwards"}  # what the run spent, which sharding changes; every result must match
    summaries = [{k: v for k, v in r.result.summary.items() if k not in cost} for r in (local, sharded)]
    assert_same_records(*([row] for row in summaries))
    assert not shard_directory(out).exists()  # removed once the run directory is written


def test_failing_shard_is_named_and_the_run_resumes(toy, tmp_path):
    task, out = names_task(7), tmp_path / "out"
    options = {"site": "z", "by": "layer,head"}
    broken = Executor(shard_size=3, resume=True, fault=Fault("raise-always", 2, str(tmp_path / "marker")))
    with pytest.raises(AnalysisError, match=r"shard 2 failed 2 times \(1 prompt\(s\): 'When John and Tom"):
        run("patch", model=toy, task=task, out=out, executor=broken, **options)
    assert not out.exists()
    finished = {p.name: p.stat().st_mtime_ns for p in shard_directory(out).iterdir()}
    assert len(finished) == 2  # shards 0 and 1 were saved as they finished
    resumed = run("patch", model=toy, task=task, out=out, executor=Executor(shard_size=3, resume=True), **options)
    assert_same_records(run("patch", model=toy, task=task, **options).result.records, resumed.result.records)
    assert (out / "results.json").is_file() and not shard_directory(out).exists()


def test_a_shard_that_fails_once_is_retried(toy, tmp_path):
    flaky = Executor(shard_size=4, resume=True, fault=Fault("raise-once", 1, str(tmp_path / "marker")))
    done = run("attribute/dla", model=toy, task=names_task(7), out=tmp_path / "out", executor=flaky)
    assert (tmp_path / "marker").exists()
    assert_same_records(run("attribute/dla", model=toy, task=names_task(7)).result.records, done.result.records)


def test_a_bad_input_found_in_a_shard_fails_at_once_with_its_own_message(toy, tmp_path):
    """Receivers are resolved against the model, so a bad one is found by the first shard: that is the user's
    error (the same in every shard), reported as is and never retried."""
    calls = []
    entry = get_analysis("path-patch")
    assert entry.shard is not None
    original = entry.shard.partial

    def counting(*args):
        calls.append(1)
        return original(*args)

    executor = Executor(shard_size=3, resume=True)
    patched = dataclasses.replace(entry, shard=dataclasses.replace(entry.shard, partial=counting))
    with pytest.raises(CircuitlabError, match="a9") as raised:
        executor.compute(patched, "toy", toy, names_task(7), entry.make_params({"receivers": "a9.h*<q>"}),
                         ShardStore(None))
    assert "failed" not in str(raised.value) and len(calls) == 1
