"""Sharded discovery measures its circuits on the shards too: the faithfulness curve, the chosen circuit's
faithfulness and the target-faithfulness bisection are further passes over the prompt shards (no masked run
of the whole task on the driver), equal to the one-process run; a failing shard of such a pass is named and
the run resumes from every finished shard of every pass (the Ray backend: tests/integration/runner)."""

from __future__ import annotations

import pytest
import torch

from circuitlab.discovery import analysis
from circuitlab.discovery.faithfulness import CircuitEvaluator
from circuitlab.errors import AnalysisError
from circuitlab.runner import run
from circuitlab.runner.executor import Executor, Fault
from circuitlab.runner.shards import ShardStore, shard_directory
from unit.runner.test_executor import TOLERANCE, assert_same_records, names_task

PASS = "circuitlab.discovery.analysis:_circuit_metrics"
CALLS: list[tuple[int, int]] = []  # (prompts of the shard, circuits) of each call of the counting pass
CIRCUIT_METRICS = analysis._circuit_metrics  # the real pass, kept before a test swaps in the counting one


def counting_circuit_metrics(model, shard, params, masks):
    """`_circuit_metrics`, counted (module level: the executor runs passes by their importable name)."""
    CALLS.append((len(shard), masks.shape[0]))
    return CIRCUIT_METRICS(model, shard, params, masks)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a))


def assert_same_discovery(local, sharded) -> None:
    """Curve values, the chosen circuit edge for edge, its faithfulness, CPR and CMD; every record."""
    a, b = local.output, sharded.output
    assert torch.equal(a.circuit.in_graph, b.circuit.in_graph)
    assert close(a.faithfulness, b.faithfulness), (a.faithfulness, b.faithfulness)
    assert (a.curve is None) == (b.curve is None)
    if a.curve is not None:
        assert a.curve.sizes == b.curve.sizes and a.curve.metric == b.curve.metric
        for x, y in zip(a.curve.faithfulness + a.curve.metrics + [a.curve.full, a.curve.empty, a.curve.cpr, a.curve.cmd],
                        b.curve.faithfulness + b.curve.metrics + [b.curve.full, b.curve.empty, b.curve.cpr, b.curve.cmd],
                        strict=True):
            assert close(x, y), (x, y)
    assert_same_records(local.result.records, sharded.result.records)
    assert_same_records([local.result.summary], [sharded.result.summary])


def threshold_between_ranks(toy, task, rank: int) -> float:
    """A threshold half-way between the rank-th and the next strongest |score|: far from every score, so
    rounding of the sharded scores cannot move an edge across it."""
    done = run("discover/eap-ig", model=toy, task=task, steps=2, top_n=1, curve=False)
    strengths = done.output.scoring.scores.abs().nan_to_num(0.0).sort(descending=True).values
    return float(strengths[rank - 1] + strengths[rank]) / 2


@pytest.mark.parametrize("selection", ["top_n", "threshold", "target_faithfulness"])
def test_sharded_discovery_measures_on_the_shards_and_equals_the_local_run(toy, tmp_path, monkeypatch, selection):
    task = names_task(7)  # shards of 3 + 3 + 1 prompts, two token-length groups spanning shards
    value = {"top_n": 9, "threshold": threshold_between_ranks(toy, task, 12), "target_faithfulness": 0.7}[selection]
    options = {"steps": 2, selection: value}
    local = run("discover/eap-ig", model=toy, task=task, **options)

    built: list[int] = []
    original_init = CircuitEvaluator.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self.prepared.n_prompts)

    CALLS.clear()
    monkeypatch.setattr(CircuitEvaluator, "__init__", recording_init)
    monkeypatch.setattr(analysis, "_circuit_metrics", counting_circuit_metrics)
    sharded = run("discover/eap-ig", model=toy, task=task, out=tmp_path / "out",
                  executor=Executor(resume=True, shard_size=3), **options)
    assert_same_discovery(local, sharded)

    # every masked run happened in a shard: no evaluator of the whole task, every pass over all three shards
    assert built and max(built) <= 3
    assert len(CALLS) % 3 == 0 and [n for n, _ in CALLS[:3]] == [3, 3, 1]
    curve_points = len(local.output.curve.sizes)
    if selection == "target_faithfulness":  # m(full), m(empty) and the curve in one pass, then one per step
        assert CALLS[0][1] == 2 + curve_points and all(k == 1 for _, k in CALLS[3:]) and len(CALLS) > 3
    else:  # ... and the chosen circuit in that same pass: one pass in all
        assert CALLS == [(3, 3 + curve_points), (3, 3 + curve_points), (1, 3 + curve_points)]


def test_undefined_faithfulness_is_found_on_the_whole_task(toy, tmp_path):
    """The shards skip the check (a shard may show no behaviour where the task does); the merged m(full) and
    m(empty) are checked as in one process."""
    same = names_task(4)
    same = type(same)(same.name, [type(e)(e.clean, e.clean, e.answer, e.wrong) for e in same.examples])
    with pytest.raises(Exception, match="faithfulness is undefined"):
        run("discover/eap", model=toy, task=same, top_n=3)
    with pytest.raises(Exception, match="faithfulness is undefined"):
        run("discover/eap", model=toy, task=same, top_n=3, out=tmp_path / "out",
            executor=Executor(resume=True, shard_size=3))


def test_a_failing_shard_of_the_curve_pass_is_named_and_the_run_resumes(toy, tmp_path, monkeypatch):
    task, out = names_task(7), tmp_path / "out"
    options = {"steps": 2, "top_n": 9}
    broken = Executor(shard_size=3, resume=True, fault=Fault("raise-always", 2, str(tmp_path / "marker"), stage=PASS))
    with pytest.raises(AnalysisError, match=rf"shard 2 failed 2 times \(1 prompt\(s\): 'When John and Tom.*\) in the "
                                            rf"pass {PASS}: injected failure"):
        run("discover/eap-ig", model=toy, task=task, out=out, executor=broken, **options)
    assert not out.exists()
    assert len(list(shard_directory(out).iterdir())) == 3 + 2  # every scoring shard, two shards of the curve pass

    saved: list[int] = []
    original_save = ShardStore.save

    def recording_save(self, index, key, partial):
        saved.append(index)
        original_save(self, index, key, partial)

    monkeypatch.setattr(ShardStore, "save", recording_save)
    resumed = run("discover/eap-ig", model=toy, task=task, out=out, executor=Executor(shard_size=3, resume=True),
                  **options)
    assert saved == [2]  # only the failed shard of the curve pass ran again
    assert_same_discovery(run("discover/eap-ig", model=toy, task=task, **options), resumed)
    assert (out / "results.json").is_file() and not shard_directory(out).exists()


def test_a_pass_is_named_by_an_importable_function_and_keyed_by_its_payload_bytes():
    from circuitlab.runner.executor import reference
    from circuitlab.runner.shards import payload_digest

    assert reference(counting_circuit_metrics).endswith("test_shards:counting_circuit_metrics")
    with pytest.raises(AnalysisError, match="module-level function"):
        reference(lambda model, shard, params, payload: None)
    masks = torch.tensor([[True, False, True], [False, False, True]])
    assert payload_digest(masks) == payload_digest(masks.t().contiguous().t())  # same values, other strides
    assert payload_digest(masks) != payload_digest(masks.to(torch.uint8))  # same bytes, other dtype
    assert payload_digest(masks) != payload_digest(masks[:, [0, 2, 1]])
    with pytest.raises(TypeError, match="no stable digest"):
        payload_digest(object())
