"""Path patching over prompt shards (``--backend ray`` / ``--resume``): the merged run equals the
one-process run in every record, summary number and figure value, for each sweep method, with shards of
unequal size whose token-length groups span shards (the local backend with resume=True runs the shards in
this process)."""

from __future__ import annotations

import math

import pytest
import torch

from circuitlab.graph.analysis import PATH_PATCH, combine_parts, path_patch_part
from circuitlab.runner import run
from circuitlab.runner.executor import Executor
from circuitlab.runner.registry import sharded_names
from circuitlab.runner.shards import split_task
from unit.runner.test_executor import TOLERANCE, assert_same_records, names_task

# TOLERANCE (64 float32 eps, relative to max(1, |value|)): shards batch prompts differently and the merge
# averages group means in another order, so values differ by float32 summation rounding only.


def close(a: torch.Tensor | float, b: torch.Tensor | float) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    both_nan = a.isnan() & b.isnan()
    return bool((both_nan | ((a - b).abs() <= TOLERANCE * a.abs().clamp(min=1.0))).all())


def test_path_patch_is_sharded():
    assert "path-patch" in sharded_names()
    assert PATH_PATCH.shard is not None and PATH_PATCH.shard.check is None  # every option merges exactly


@pytest.mark.parametrize("receivers, method", [("a1.h*<q>", "auto"), ("logits", "auto"), ("a1.h*<v>", "masked")])
def test_sharded_path_patch_equals_the_one_process_run(toy, tmp_path, receivers, method):
    """7 prompts, every third one token longer, in shards of 3+3+1: both token-length groups span shards."""
    task = names_task(7)
    options = {"receivers": receivers, "method": method, "max_batch": 8}
    local = run("path-patch", model=toy, task=task, **options)
    sharded = run("path-patch", model=toy, task=task, out=tmp_path / "out",
                  executor=Executor(resume=True, shard_size=3), **options)
    assert_same_records(local.result.records, sharded.result.records)
    a, b = local.result.summary, sharded.result.summary
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):
            assert close(value, b[key]) or (math.isnan(value) and math.isnan(b[key])), key
        else:
            assert value == b[key], key
    assert b["n_prompts"] == 7 and len(b["token_lengths"]) == 2
    sa, sb = local.output.sweep, sharded.output.sweep  # the figure's numbers
    assert close(sa.values, sb.values) and close(sa.normalised, sb.normalised)
    assert sa.other.keys() == sb.other.keys()
    assert all(close(sa.other[name], sb.other[name]) for name in sa.other)


def test_a_naive_merge_would_be_caught(toy):
    """The case above has teeth: averaging the shards' own runs (a 3-prompt shard counting as much as a
    1-prompt one) misses the one-process numbers by far more than the tolerance."""
    task, params = names_task(7), PATH_PATCH.make_params({"receivers": "a1.h*<q>"})
    local = run("path-patch", model=toy, task=task, receivers="a1.h*<q>").output
    parts = [path_patch_part(toy, shard, params) for shard in split_task(task, 3)]
    assert combine_parts(parts, params).token_lengths == local.token_lengths
    runs = [combine_parts([part], params) for part in parts]
    assert [r.n_prompts for r in runs] == [3, 3, 1]
    assert not close(sum(r.sweep.clean for r in runs) / len(runs), local.sweep.clean)
    naive = torch.stack([r.sweep.values for r in runs]).mean(0)
    assert not close(naive[0], local.sweep.values[0])
