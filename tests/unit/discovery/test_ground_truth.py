"""Ground-truth circuits: each model does its job, its true circuit alone keeps the behaviour, the shipped
files match their definitions, and EAP / EAP-IG / exact edge effects recover the truth (ROC AUC over edges).

Measured ROC AUCs over edges (ranking by |score|), n = 8 / n = 32 prompts:
  hand-set, every ablation (corrupt, mean, resample, zero):  exact 1.0, EAP 1.0, EAP-IG 1.0
  trained, corrupt:   exact 0.999 / 1.0, EAP 0.982 / 0.993, EAP-IG 0.992 / 0.993
  trained, mean:      exact 0.998 / 1.0, EAP 0.966 / 0.992, EAP-IG 0.993 / 0.997
  trained, resample:  exact 1.0 / 1.0,   EAP 0.904 / 0.966, EAP-IG 0.959 / 0.959
"""

from __future__ import annotations

import math

import pytest
import torch

from circuitlab.discovery import edge_scores
from circuitlab.discovery.ground_truth import (
    ATTN_LOGIT,
    DIRS,
    HANDSET,
    HANDSET_VOCAB,
    INDUCTION_HEAD,
    LOGIT_SCALE,
    PREV_HEAD,
    ROLE_THRESHOLD,
    TRAINED,
    TRUTH_FILE,
    ZERO_TRUTH_FILE,
    attention_patterns,
    derive_true_edges,
    head_roles,
    induction_scores,
    load_ground_truth,
    mechanism_edges,
    previous_token_scores,
    repeated_tokens_task,
    roc_auc,
    true_circuit,
)
from circuitlab.discovery.ground_truth_train import induction_losses, train
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit

EPS = torch.finfo(torch.float32).eps
N = 8  # prompts per task: every edge's effect is a mean over 8 x 8 scored positions
# Hand-set: every edge outside the circuit has zero weights on its path (a zero head, or a subspace its
# receiver does not read), so its exact effect and its EAP / EAP-IG gradient are 0 up to float32 rounding,
# while each true edge moves the metric by nats. Any correct method ranks every true edge first: AUC 1.0.
# Trained: the truth comes from head scores (ground_truth.head_roles), not from the weights. Three layer-0
# heads share their attention between the current and the previous token (scores <= 0.49) and are left out,
# though their value inputs carry a little previous-token signal (exact effect of input->a0.h3<v> is
# -0.034 vs -0.046 for the weakest true edge), so a faithful method may rank a few of their edges among the
# weakest true ones. Measured (n = 8, corrupt): exact 0.999, EAP 0.982, EAP-IG 0.992. The floor is 0.9:
# below it a method misses true edges outright, which the issue calls a defect to explain.
TRAINED_AUC_FLOOR = 0.9


@pytest.fixture(scope="module")
def handset():
    return load_ground_truth(HANDSET, n=N)


@pytest.fixture(scope="module")
def trained():
    return load_ground_truth(TRAINED, n=N)


def _metric(model, task, logits_fn):
    prepared = task.prepare(model)
    batch = prepared.single_batch()
    with torch.no_grad():
        return float(prepared.metric(logits_fn(batch), batch).mean())


# --- the hand-set model ----------------------------------------------------------------------------------

def test_handset_model_predicts_every_second_copy_token(handset):
    model, task, _ = handset
    batch = task.prepare(model).single_batch()
    with torch.no_grad():
        logits = model.logits(batch.clean)
    scored = batch.targets >= 0
    assert torch.equal(logits.argmax(-1)[scored], batch.targets[scored])
    # Bound from the design: the matching key gets attention >= a (at most 16 other keys, all scoring 0),
    # so the target's logit is >= LOGIT_SCALE * a and every other logit <= LOGIT_SCALE * (1 - a).
    a = math.exp(ATTN_LOGIT) / (math.exp(ATTN_LOGIT) + 16)
    bound = -math.log1p((HANDSET_VOCAB - 1) * math.exp(-LOGIT_SCALE * (2 * a - 1)))
    clean = _metric(model, task, lambda b: model.logits(b.clean))
    corrupt = _metric(model, task, lambda b: model.logits(b.corrupt))
    assert clean >= bound
    assert corrupt < math.log(1 / 8)  # unrepeated: at best a guess among the 8 tokens seen (it is about -3.7)


def test_handset_heads_and_shipped_truth_match_the_design(handset):
    model, task, truth = handset
    assert head_roles(model, task) == {"previous_token": [PREV_HEAD], "induction": [INDUCTION_HEAD]}
    assert truth.edges == sorted(mechanism_edges([PREV_HEAD], [INDUCTION_HEAD]), key=truth.graph.edge_id)
    zero = true_circuit(HANDSET, model, ablation="zero")
    positional = mechanism_edges([PREV_HEAD], [INDUCTION_HEAD], positional=True)
    assert zero.edges == sorted(positional, key=zero.graph.edge_id)
    assert set(zero.edges) - set(truth.edges) == {"input->a0.h1<q>", "input->a0.h1<k>"}


@pytest.mark.parametrize("ablation", ["corrupt", "zero"])
def test_handset_truth_alone_is_the_whole_model(handset, ablation):
    """Every edge outside the truth carries nothing the output uses, so the circuit equals the full model up
    to float32 rounding (summation order: a sum of <= d_model one-hot terms per layer, logits <= 6)."""
    model, task, _ = handset
    truth = true_circuit(HANDSET, model, ablation=ablation)
    batch = task.prepare(model).single_batch()
    with torch.no_grad():
        full = model.logits(batch.clean)
        circuit = truth.run(batch.clean, ablation, corrupt=batch.corrupt)
        empty = Circuit.empty(truth.graph, model=model).run(batch.clean, ablation, corrupt=batch.corrupt)
    tolerance = 16 * EPS * float(full.abs().max())
    assert float((circuit - full).abs().max()) <= tolerance
    assert float((empty - full).abs().max()) > 1.0  # the check can fail: nothing kept, induction gone


def test_position_edges_matter_under_zero_ablation_only(handset):
    model, task, truth = handset  # truth for corrupt ablation: no position edges
    batch = task.prepare(model).single_batch()
    with torch.no_grad():
        full = model.logits(batch.clean)
        corrupt_run = truth.run(batch.clean, "corrupt", corrupt=batch.corrupt)
        zero_run = truth.run(batch.clean, "zero")
    assert float((corrupt_run - full).abs().max()) <= 16 * EPS * float(full.abs().max())
    assert float((zero_run - full).abs().max()) > 1.0  # zeroed positions: the previous-token head is lost


@pytest.mark.parametrize("method,ablation", [
    ("exact", "corrupt"), ("exact", "zero"),
    ("eap", "corrupt"), ("eap", "mean"), ("eap", "resample"), ("eap", "zero"),
    ("eap-ig", "corrupt"), ("eap-ig", "mean"), ("eap-ig", "resample"), ("eap-ig", "zero"),
])
def test_every_method_recovers_the_handset_circuit(handset, method, ablation):
    model, task, _ = handset
    truth = true_circuit(HANDSET, model, ablation=ablation)
    scoring = edge_scores(model, task, method=method, ablation=ablation)
    assert roc_auc(scoring.scores, truth.in_graph) == 1.0
    inside, outside = scoring.scores[truth.in_graph].abs(), scoring.scores[~truth.in_graph].abs()
    # outside edges score 0 in exact arithmetic: only rounding may show, far below the weakest true edge
    assert float(outside.max()) <= 1e-3 * float(inside.min())
    if method == "exact":
        assert float(inside.min()) > 1.0  # each true edge alone costs more than a nat


# --- the trained model -----------------------------------------------------------------------------------

def test_trained_model_does_induction(trained):
    model, _, _ = trained
    losses = induction_losses(model)
    # Uniform guessing costs log(31) = 3.4 nats; the second copy is predicted almost perfectly.
    assert losses["second_copy"] < 0.1
    assert losses["first_copy"] > math.log(HANDSET_VOCAB - 1)


def test_trained_truth_follows_from_the_head_scores(trained):
    model, _, truth = trained
    task = repeated_tokens_task(model.d_vocab)  # the task the shipped truth was derived on
    assert truth.edges == sorted(derive_true_edges(model, task), key=truth.graph.edge_id)
    roles = head_roles(model, task)
    assert len(roles["previous_token"]) >= 1 and len(roles["induction"]) >= 1
    # The threshold sits in a wide gap of the scores, so the roles do not hinge on its exact value.
    patterns = attention_patterns(model, torch.tensor([ex.clean_ids for ex in task.examples]))
    scores = torch.cat([previous_token_scores(patterns)[0], induction_scores(patterns, 8)[1]])
    assert not ((scores > ROLE_THRESHOLD - 0.15) & (scores < ROLE_THRESHOLD + 0.1)).any(), scores


def test_trained_truth_alone_keeps_the_behaviour(trained):
    """Normalised faithfulness (circuit - corrupt) / (full - corrupt) of the true circuit: >= 0.9 (measured
    0.99; the heads left out by the role threshold carry the rest)."""
    model, task, truth = trained
    full = _metric(model, task, lambda b: model.logits(b.clean))
    corrupt = _metric(model, task, lambda b: model.logits(b.corrupt))
    circuit = _metric(model, task, lambda b: truth.run(b.clean, corrupt=b.corrupt))
    assert full - corrupt > 3.0
    assert (circuit - corrupt) / (full - corrupt) >= 0.9


@pytest.mark.parametrize("method", ["exact", "eap", "eap-ig"])
def test_methods_recover_the_trained_circuit(trained, method):
    model, task, truth = trained
    scoring = edge_scores(model, task, method=method, ablation="corrupt")
    assert roc_auc(scoring.scores, truth.in_graph) >= TRAINED_AUC_FLOOR


def test_training_script_reproduces_the_shipped_weights(trained):
    """Retrain with the shipped settings (about 3 s of one CPU thread) and compare.

    Tolerance: a relative 1e-6 perturbation of the initial weights (far above the rounding differences
    between CPUs) moves the trained weights by at most 5e-4, so 5e-3 is a 10x margin. Key biases are
    excluded: they add q . b_K to every key's score alike, which the softmax cancels, so their gradient is
    0 up to rounding and Adam's normalised steps let them drift freely without changing the function.
    """
    shipped, _, truth = trained
    model, losses = train()
    ours, theirs = model.bridge.state_dict(), shipped.bridge.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key.endswith("k.bias"):
            continue
        assert float((ours[key] - theirs[key]).abs().max()) <= 5e-3, key
    assert losses[-1] < 1.0
    task = repeated_tokens_task(model.d_vocab)
    assert sorted(derive_true_edges(model, task), key=truth.graph.edge_id) == truth.edges


# --- pieces ----------------------------------------------------------------------------------------------

def test_roc_auc():
    truth = torch.tensor([True, True, False, False])
    assert roc_auc(torch.tensor([4.0, -3.0, 2.0, 1.0]), truth) == 1.0  # ranks by |score|
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0, -4.0]), truth) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0, 1.0, 1.0]), truth) == 0.5  # ties count one half
    assert roc_auc(torch.tensor([3.0, 1.0, 2.0, 0.0]), truth) == 0.75
    with pytest.raises(DiscoveryError, match="at least one"):
        roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_repeated_tokens_task_layout():
    task = repeated_tokens_task(32, n=4, seq_len=8)
    for ex in task.examples:
        x = ex.clean_ids[1:9]
        assert ex.clean_ids == [0, *x, *x] and len(set(x)) == 8
        assert not set(ex.corrupt_ids[1:]) & set(x) and len(set(ex.corrupt_ids[1:])) == 16
        assert ex.targets == [-1] * 9 + x[1:] + x[:1]
    with pytest.raises(DiscoveryError, match="distinct tokens"):
        repeated_tokens_task(16, seq_len=8)


def test_bad_names_and_ablations():
    with pytest.raises(DiscoveryError, match="unknown ground truth"):
        load_ground_truth("induction")
    with pytest.raises(DiscoveryError, match="not 'zero'"):
        load_ground_truth(TRAINED, ablation="zero")


def test_shipped_files_are_where_the_package_data_says():
    for name in (HANDSET, TRAINED):
        assert (DIRS[name] / TRUTH_FILE).is_file()
    assert (DIRS[HANDSET] / ZERO_TRUTH_FILE).is_file()
    weights = DIRS[TRAINED] / "model.safetensors"
    assert weights.stat().st_size < 200_000  # a few tens of KB: fine to ship in the wheel
