"""`--backend ray` on a local 2-worker cluster (1 thread each), started once for this module: records equal to
the one-process run on a toy model and on SmolLM2, a worker that dies mid-run, and resume after a failure."""

from __future__ import annotations

import pytest
from unit.runner.test_executor import assert_same_records, names_task

from circuitlab.runner import run
from circuitlab.runner.executor import Executor, Fault
from circuitlab.runner.shards import shard_directory

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for every test here (start-up costs seconds); the runs join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def ray_executor(**options) -> Executor:
    return Executor(backend="ray", workers=2, threads_per_worker=1, shard_size=3, **options)


def test_toy_runs_on_ray_equal_the_local_run_and_survive_a_dead_worker(cluster, toy, toy_dir, tmp_path):
    task = names_task(7)
    options = {"site": "z", "by": "layer,head", "per_prompt": True}
    local = run("patch", model=toy, task=task, **options)
    # shard 1's worker process exits mid-run (as when a machine dies): Ray restarts it and retries the shard
    dying = ray_executor(fault=Fault("exit-once", 1, str(tmp_path / "died")))
    done = run("patch", model=str(toy_dir), task=task, out=tmp_path / "out", executor=dying, **options)
    assert (tmp_path / "died").exists()
    assert_same_records(local.result.records, done.result.records)
    assert not shard_directory(tmp_path / "out").exists()


def test_ray_run_resumes_after_a_failing_shard(cluster, toy, toy_dir, tmp_path):
    task, out = names_task(7), tmp_path / "out"
    options = {"top_n": 5, "curve": False}
    failing = ray_executor(fault=Fault("raise-always", 2, str(tmp_path / "marker")))
    with pytest.raises(Exception, match="shard 2 failed 2 times"):
        run("discover/eap", model=str(toy_dir), task=task, out=out, executor=failing, **options)
    assert len(list(shard_directory(out).iterdir())) == 2 and not out.exists()
    resumed = run("discover/eap", model=str(toy_dir), task=task, out=out, executor=ray_executor(resume=True),
                  **options)
    assert_same_records(run("discover/eap", model=toy, task=task, **options).result.records,
                        resumed.result.records)


def test_smollm_dla_on_ray_equals_the_local_run(cluster, smollm, tmp_path):
    local = run("attribute/dla", model=smollm, task="ioi", n=4)
    sharded = run("attribute/dla", model="smollm2-135m", task="ioi", n=4, out=tmp_path / "out",
                  executor=Executor(backend="ray", workers=2, shard_size=2))
    assert_same_records(local.result.records, sharded.result.records)
    assert sharded.result.summary["n_prompts"] == 4


@pytest.mark.parametrize("analysis, options", [
    ("attribute/atp", {"sites": ("z", "resid_pre"), "direction": "noise"}),
    ("path-patch", {"receivers": "a1.h*<q>"}),
])
def test_toy_atp_and_path_patch_on_ray_equal_the_local_run(cluster, toy, toy_dir, tmp_path, analysis, options):
    """Shards of 3+3+1 prompts whose two token-length groups span shards: merged exactly by the driver."""
    task = names_task(7)
    local = run(analysis, model=toy, task=task, **options)
    sharded = run(analysis, model=str(toy_dir), task=task, out=tmp_path / "out", executor=ray_executor(), **options)
    assert_same_records(local.result.records, sharded.result.records)
    assert sharded.result.summary["n_prompts"] == 7 and len(sharded.result.summary["token_lengths"]) == 2


def test_verify_on_ray_equals_the_local_run(cluster, toy, toy_dir, tmp_path):
    """Circuit verification over 3 shards on 2 workers: prompts of two token lengths, a test split cutting a
    shard, the mean and resample rows measured on the driver; every number and file as in one process."""
    import torch
    from unit.verify.test_shards import assert_same_verification

    from circuitlab.graph.circuit import Circuit
    from circuitlab.graph.graph import Graph

    graph = Graph.from_model(toy)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(1))
    circuit = str(Circuit.top_n(graph, scores, 15).save(tmp_path / "circuit.json"))
    options = {"circuit": circuit, "split": "test", "greedy_steps": 0, "subsets": 2, "n_bootstrap": 100,
               "noise": (0.0, 0.2)}
    local = run("verify", model=toy, task=names_task(7), **options)
    sharded = run("verify", model=str(toy_dir), task=names_task(7), out=tmp_path / "out", executor=ray_executor(),
                  **options)
    assert_same_verification(local, sharded)


def test_discovery_curve_and_bisection_on_ray_equal_the_local_run(cluster, toy, toy_dir, tmp_path):
    """EAP-IG with a target faithfulness: the scores, then the curve and each bisection step as passes over
    the same 3 shards on the same 2 workers; the curve, the circuit and its faithfulness as in one process."""
    from unit.discovery.test_shards import assert_same_discovery

    options = {"steps": 2, "target_faithfulness": 0.7}
    local = run("discover/eap-ig", model=toy, task=names_task(7), **options)
    sharded = run("discover/eap-ig", model=str(toy_dir), task=names_task(7), out=tmp_path / "out",
                  executor=ray_executor(), **options)
    assert_same_discovery(local, sharded)
