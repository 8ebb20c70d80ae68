"""The IOI study (studies/ioi.py): the role rules on hand-made numbers, the name positions, the attention
read at END, path effects against the masked-edge reference, and the whole study on the toy model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitlab.errors import AnalysisError, DiscoveryError, TaskError
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_patch
from circuitlab.runner import run
from circuitlab.runner.registry import get_analysis
from circuitlab.studies.ioi import (
    DUPLICATE,
    INDUCTION,
    NAME_MOVER,
    NEGATIVE,
    OTHER,
    S_INHIBITION,
    HeadMeasures,
    IOIStudyParams,
    Thresholds,
    classify_head,
    end_attention,
    name_positions,
    path_effects,
)
from circuitlab.tasks.task import Example, Task

F32 = torch.finfo(torch.float32).eps
ROWS = [  # ABBA and BABA in the toy vocabulary (tests/conftest.py)
    ("When Mary and John went to the store , John gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
    ("When Mary and John went to the store , Mary gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " John", " Mary"),
]


@pytest.fixture(scope="module")
def ioi_task():
    return Task("names", [Example(clean, corrupt, [answer], [wrong]) for clean, corrupt, answer, wrong in ROWS])


def head(**numbers) -> HeadMeasures:
    """A head with neutral numbers (no role, outside the circuit) except the ones given."""
    base = dict(layer=3, head=1, in_circuit=False, attn_io=0.05, attn_s1=0.05, attn_s2=0.05, dla=0.0,
                dla_share=0.0, prev_token=0.0, duplicate_token=0.0, induction=0.0)
    return HeadMeasures(**{**base, **numbers})


T = Thresholds(attention=0.2, dla=0.05, effect=0.05, detector=0.3)


# --- the rules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numbers, role", [
    ({"attn_io": 0.6, "attn_s1": 0.1, "attn_s2": 0.1, "dla_share": 0.2}, NAME_MOVER),
    ({"attn_io": 0.6, "attn_s1": 0.1, "attn_s2": 0.1, "dla_share": -0.1}, NEGATIVE),
    # attends to the IO, but no direct effect beyond the floor: not a name mover (and outside the circuit)
    ({"attn_io": 0.6, "dla_share": 0.04}, None),
    ({"attn_io": 0.6, "dla_share": 0.04, "in_circuit": True}, OTHER),
    # attends more to the subject than to the IO: not a name mover, whatever its direct effect
    ({"attn_io": 0.3, "attn_s1": 0.1, "attn_s2": 0.25, "dla_share": 0.2}, None),
    ({"attn_io": 0.19, "dla_share": 0.2}, None),  # just under the attention floor
    ({"nm_effect": -0.2, "attn_s2": 0.4}, S_INHIBITION),
    ({"nm_effect": -0.2, "attn_s2": 0.1}, None),  # effect without attention to S2
    ({"nm_effect": -0.04, "attn_s2": 0.4}, None),  # attention without enough effect
    ({"nm_effect": 0.3, "attn_s2": 0.4}, None),  # helps the name movers' queries the wrong way
    ({"sinh_effect": -0.1, "induction": 0.7, "duplicate_token": 0.2}, INDUCTION),
    ({"sinh_effect": -0.1, "induction": 0.2, "duplicate_token": 0.5}, DUPLICATE),
    ({"sinh_effect": -0.1, "induction": 0.2, "duplicate_token": 0.25}, None),  # both scores under the floor
    ({"sinh_effect": -0.01, "induction": 0.9}, None),  # an induction head with no effect through S-inhibition
    ({"induction": 0.9, "duplicate_token": 0.9}, None),  # not measured (NaN effects): no role
    # the first rule wins: a name mover that also inhibits stays a name mover
    ({"attn_io": 0.6, "dla_share": 0.2, "nm_effect": -0.5, "attn_s2": 0.3}, NAME_MOVER),
])
def test_classify_head_follows_the_rules(numbers, role):
    assert classify_head(head(**numbers), T) == role


def test_nan_effects_never_assign_a_role():
    m = head(nm_effect=math.nan, sinh_effect=math.nan, attn_s2=0.9, induction=1.0, duplicate_token=1.0)
    assert classify_head(m, T) is None
    assert classify_head(head(nm_effect=math.nan, in_circuit=True), T) == OTHER


@pytest.mark.parametrize("options, message", [
    ({"attention_floor": 0.0}, "attention_floor"),
    ({"dla_floor": 1.5}, "dla_floor"),
    ({"effect_floor": True}, "effect_floor"),
    ({"detector_floor": -0.1}, "detector_floor"),
    ({"target_faithfulness": 1.5}, "target faithfulness"),
    ({"top_n": -1}, "top-n"),
    ({"n_bootstrap": 0}, "n_bootstrap"),
    ({"max_batch": 2.5}, "max_batch"),
    ({"top_n": 10, "target_faithfulness": 0.9}, "not both"),
])
def test_params_are_checked_without_a_model(options, message):
    with pytest.raises((AnalysisError, DiscoveryError), match=message):
        IOIStudyParams(**options)


def test_params_defaults_and_registration():
    params = IOIStudyParams()
    assert params.thresholds == Thresholds()
    entry = get_analysis("study/ioi")
    assert entry.params is IOIStudyParams and entry.name == "study/ioi"


# --- positions and attention ------------------------------------------------------------------------------------

def test_name_positions_are_read_from_the_tokens(toy, ioi_task):
    batch = ioi_task.prepare(toy).single_batch()
    where = name_positions(batch)
    for row, (clean, _, answer, wrong) in enumerate(ROWS):
        tokens = toy.str_tokens(batch.clean[row])
        offset = len(tokens) - len(clean.split())  # a BOS token, if the toy model adds one
        words = clean.split()
        assert int(where.io[row]) == offset + words.index(answer.strip())
        assert int(where.s1[row]) == offset + words.index(wrong.strip())
        assert int(where.s2[row]) == offset + len(words) - 1 - words[::-1].index(wrong.strip())
        assert int(where.end[row]) == len(tokens) - 1
    assert int(where.io[0]) < int(where.s1[0]) and int(where.s1[1]) < int(where.io[1])  # ABBA, BABA


def test_name_positions_refuse_a_prompt_without_a_repeated_subject(toy):
    task = Task("bad", [Example("When Mary and John went to the store , Tom gave a drink to",
                                "When Tom and Anna went to the store , Paul gave a drink to", [" Mary"], [" John"])])
    with pytest.raises(TaskError, match="not an IOI prompt"):
        name_positions(task.prepare(toy).single_batch())


def test_end_attention_reads_the_end_row_at_each_name():
    # 1 layer, 2 prompts, 1 head, 5 positions; each prompt's END row puts known weights on its names.
    patterns = torch.zeros(1, 2, 1, 5, 5)
    patterns[0, 0, 0, 4, [1, 2, 3]] = torch.tensor([0.5, 0.2, 0.3])
    patterns[0, 1, 0, 3, [2, 0, 1]] = torch.tensor([0.6, 0.1, 0.3])
    from circuitlab.studies.ioi import NamePositions

    where = NamePositions(io=torch.tensor([1, 2]), s1=torch.tensor([2, 0]), s2=torch.tensor([3, 1]),
                          end=torch.tensor([4, 3]))
    got = end_attention(patterns, where)  # [3, batch, layer, head]
    assert got.shape == (3, 2, 1, 1)
    assert torch.equal(got[:, 0, 0, 0], torch.tensor([0.5, 0.2, 0.3]))
    assert torch.equal(got[:, 1, 0, 0], torch.tensor([0.6, 0.1, 0.3]))


# --- path effects against the reference ---------------------------------------------------------------------------

def test_path_effects_equal_masked_path_patching(toy, ioi_task):
    prepared = ioi_task.prepare(toy)
    batch = prepared.single_batch()
    engine = MaskedEdgeEngine(toy, Graph.from_model(toy))
    receivers = ["a1.h0<q>", "a1.h1<q>"]
    senders = ["a0.h0", "a0.h1", "a1.h0"]  # a1.h0 feeds no receiver of its own layer: left out
    effects = path_effects(engine, prepared, senders, receivers, max_batch=4)
    assert set(effects) == {"a0.h0", "a0.h1"}
    with torch.no_grad():
        clean = float(prepared.metric(toy.logits(batch.clean), batch).mean())
        corrupt = float(prepared.metric(toy.logits(batch.corrupt), batch).mean())
    for sender, value in effects.items():
        patched = float(prepared.metric(path_patch(engine, sender, receivers, batch.clean, batch.corrupt), batch).mean())
        expected = (patched - clean) / (clean - corrupt)
        # restarted vs full masked forward: the same sums in another order (float32, a few ulps of the logits)
        scale = max(abs(clean), abs(corrupt), 1.0) / abs(clean - corrupt)
        assert value == pytest.approx(expected, abs=256 * F32 * scale)


# --- the whole study on the toy model ---------------------------------------------------------------------------

def test_study_runs_on_the_toy_model_and_writes_its_outputs(tmp_path, toy, ioi_task):
    out = tmp_path / "ioi"
    done = run("study/ioi", model=toy, task=ioi_task, out=out, n_bootstrap=50, steps=2, n_repeat_tokens=8,
               n_sequences=2)
    study = done.output
    assert sorted(done.result.artifacts) == ["attention_dla.png", "circuit.json", "circuit.png",
                                             "faithfulness.png", "findings.md", "roles.png"]
    summary = done.result.summary
    json.dumps(summary, allow_nan=True)  # plain data
    assert summary["circuit_edges"] == study.discovery.circuit.n_edges > 0
    assert summary["faithfulness_ci"][0] <= summary["faithfulness"] + 1e-9 <= summary["faithfulness_ci"][1] + 2e-9
    assert summary["kl"] >= 0 and 0 <= summary["top1_agreement"] <= 1
    assert summary["faithfulness"] == pytest.approx(study.discovery.faithfulness, abs=64 * F32)
    # Every record's role is the rule applied to the numbers it shows, and the records cover the circuit's heads.
    by_name = {m.name: m for m in study.measures}
    for row in done.result.records:
        assert (classify_head(by_name[row["head_name"]], study.thresholds) or "none") == row["role"]
    circuit_heads = {n for n in study.discovery.circuit.nodes if n.startswith("a")}
    assert circuit_heads <= {r["head_name"] for r in done.result.records}
    # Attention shares from END are probabilities; the DLA of the heads is a part of the logit difference.
    for m in study.measures:
        assert 0 <= m.attn_io <= 1 + 16 * F32 and m.attn_io + m.attn_s1 + m.attn_s2 <= 1 + 16 * F32
        assert m.dla_share == pytest.approx(m.dla / study.logit_diff)
    findings = (out / "findings.md").read_text()
    assert f"{study.discovery.circuit.n_edges} edges" in findings and "Wang et al." in findings
    assert str(study.faithfulness) in findings
    data = json.loads((out / "circuit.json").read_text())
    assert sum(v["in_graph"] for v in data["edges"].values()) == study.discovery.circuit.n_edges


def test_study_refuses_a_task_with_another_metric_before_the_expensive_steps(toy, ioi_task):
    from circuitlab.studies.ioi import ioi_study

    with pytest.raises(TaskError, match="logit_diff"):
        ioi_study(toy, ioi_task.with_metric("logprob"), IOIStudyParams())
