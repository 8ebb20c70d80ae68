"""Attribution patching over prompt shards (``--backend ray`` / ``--resume``): the merged run equals the
one-process run in every record, summary number and figure value, with shards of unequal size whose
token-length groups span shards (the local backend with resume=True runs the shards in this process)."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.analysis import _atp_run, _atp_sums
from circuitlab.runner import run
from circuitlab.runner.executor import Executor
from circuitlab.runner.registry import get_analysis, sharded_names
from circuitlab.runner.shards import split_task
from unit.runner.test_executor import TOLERANCE, assert_same_records, names_task

# TOLERANCE (64 float32 eps, relative to max(1, |value|)): shards batch prompts differently and the merge
# adds shard sums in another order, so values differ by float32 summation rounding only.
SITES = ("z", "resid_pre", "pattern")


def close(a: torch.Tensor | float, b: torch.Tensor | float) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(((a - b).abs() <= TOLERANCE * a.abs().clamp(min=1.0)).all())


def test_atp_is_sharded():
    assert "attribute/atp" in sharded_names()
    assert get_analysis("attribute/atp").shard.check is None  # nothing over the whole task is left unmerged


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("shard_size", [2, 3])
def test_sharded_atp_equals_the_one_process_run(toy, tmp_path, direction, shard_size):
    """7 prompts, every third one token longer: shards of 3+3+1 (or 2+2+2+1) prompts, each token-length
    group spread over several shards, one shard (size 2) holding a single group."""
    task = names_task(7)
    options = {"sites": SITES, "direction": direction}
    local = run("attribute/atp", model=toy, task=task, **options)
    sharded = run("attribute/atp", model=toy, task=task, out=tmp_path / "out",
                  executor=Executor(resume=True, shard_size=shard_size), **options)
    assert_same_records(local.result.records, sharded.result.records)
    a, b = local.output, sharded.output
    assert a.groups.lengths == b.groups.lengths and len(a.groups.lengths) == 2
    assert [x.indices for x in a.groups.batches] == [x.indices for x in b.groups.batches]
    assert a.groups.tokens == b.groups.tokens and a.groups.shown == b.groups.shown
    for key in ("clean_metric", "corrupt_metric"):
        assert close(local.result.summary[key], sharded.result.summary[key])
    assert sharded.result.summary["n_prompts"] == 7
    # the figures' numbers: every group's effects and base, and the per-head totals
    for ea, eb in zip(a.effects, b.effects, strict=True):
        assert ea.keys() == eb.keys() and all(close(ea[site], eb[site]) for site in ea)
    assert close(torch.tensor(a.bases), torch.tensor(b.bases))
    assert close(a.head_values("z"), b.head_values("z"))
    assert set(a.figures()) == set(b.figures())


def test_a_naive_merge_would_be_caught(toy):
    """The case above has teeth: averaging the shards' own runs (each normalised by its own prompts, a
    3-prompt shard counting as much as a 1-prompt one) misses the one-process numbers by far more than
    the tolerance, and keeping the shards' groups apart would give more rows."""
    task, params = names_task(7), get_analysis("attribute/atp").make_params({"sites": ("z",)})
    local = run("attribute/atp", model=toy, task=task, sites=("z",)).output
    runs = [_atp_run([_atp_sums(toy, shard, params)]) for shard in split_task(task, 3)]
    assert [r.groups.n_prompts for r in runs] == [3, 3, 1]
    assert not close(sum(r.clean_metric for r in runs) / len(runs), local.clean_metric)
    assert not close(torch.stack([r.head_values("z") for r in runs]).mean(0), local.head_values("z"))
    assert sum(len(r.records()) for r in runs) > len(local.records())
