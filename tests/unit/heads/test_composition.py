"""Composition scores: the definition on explicit matrices, TransformerLens parity (MHA and grouped-query),
the ground-truth models' K-composition, the random baseline."""

from __future__ import annotations

import pytest
import torch

from circuitlab.discovery.ground_truth import (
    HANDSET,
    INDUCTION_HEAD,
    PREV_HEAD,
    TRAINED,
    head_roles,
    load_ground_truth,
)
from circuitlab.errors import HeadsError
from circuitlab.graph.naming import head_name
from circuitlab.heads.composition import (
    MODES,
    HeadWeights,
    composition_scores,
    pair_scores,
    random_baseline,
    reader_factors,
    writer_factors,
)
from circuitlab.models.toy import ARCHITECTURES, toy_model

EPS = torch.finfo(torch.float32).eps
WORDS = "Mary John Tom Anna Paul Kate When and went to the store".split()


def _explicit(w: HeadWeights, mode: str, writer: tuple[int, int], reader: tuple[int, int]) -> float:
    """The paper's definition with the full d_model x d_model matrices, in float64."""
    def get(name: str, head: tuple[int, int]) -> torch.Tensor:
        return getattr(w, name)[head].double()

    ov1 = get("W_V", writer) @ get("W_O", writer)
    qk2 = get("W_Q", reader) @ get("W_K", reader).T
    ov2 = get("W_V", reader) @ get("W_O", reader)
    right = {"q": qk2, "k": qk2.T, "v": ov2}[mode]
    return float((ov1 @ right).norm() / (ov1.norm() * right.norm()))


@pytest.mark.parametrize("mode", MODES)
def test_factored_scores_equal_the_definition(mode):
    generator = torch.Generator().manual_seed(0)
    w = HeadWeights(*(torch.randn(2, 3, 24, 6, generator=generator) for _ in range(3)),
                    torch.randn(2, 3, 6, 24, generator=generator))
    scores = pair_scores(writer_factors(w)[0], reader_factors(w, mode)[1])
    for h1 in range(3):
        for h2 in range(3):
            # float32 products of length-24 sums, normalised: a few eps of the (<= 1) score
            assert float(scores[h1, h2]) == pytest.approx(_explicit(w, mode, (0, h1), (1, h2)), abs=64 * EPS)


def test_a_silent_head_composes_with_nothing():
    w = HeadWeights(*(torch.ones(2, 1, 8, 2) for _ in range(3)), torch.zeros(2, 1, 2, 8))
    assert float(pair_scores(writer_factors(w)[0], reader_factors(w, "k")[1])) == 0.0


@pytest.mark.parametrize("architecture", ["rms_rotary_causal", "gated_silu_gqa"])
def test_parity_with_transformer_lens_all_composition_scores(architecture):
    """TransformerLens 4's TransformerBridge.all_composition_scores (GQA: K/V repeated over each group)."""
    model = toy_model(words=WORDS, n_layers=3, seed=2, **ARCHITECTURES[architecture])
    ours = composition_scores(model, baseline_samples=2)
    for mode in MODES:
        theirs = model.bridge.all_composition_scores(mode.upper()).scores.detach()
        defined = ~ours.scores[mode].isnan()
        assert int(defined.sum()) == 3 * model.n_heads ** 2  # layer pairs (0, 1), (0, 2), (1, 2)
        assert torch.allclose(ours.scores[mode][defined], theirs[defined], rtol=0, atol=32 * EPS)
        assert (theirs[~defined] == 0).all()


def test_handset_induction_head_composes_with_the_previous_token_head():
    model, _, _ = load_ground_truth(HANDSET, n=2)
    scores = composition_scores(model, baseline_samples=4)
    assert scores.partner("k", *INDUCTION_HEAD)[0] == head_name(*PREV_HEAD)
    writer, reader, value = scores.strongest("k", 1)[0]
    assert (writer, reader) == (head_name(*PREV_HEAD), head_name(*INDUCTION_HEAD))
    # built that way: every other pair reads or writes nothing the other uses
    assert value > 0.1 and float(scores.scores["k"].nan_to_num(0).flatten().topk(2).values[1]) == 0.0


def test_trained_induction_heads_compose_with_the_previous_token_head():
    model, task, _ = load_ground_truth(TRAINED, n=8)
    roles = head_roles(model, task)
    scores = composition_scores(model, baseline_samples=4)
    for head in roles["induction"]:
        assert scores.partner("k", *head)[0] in {head_name(*p) for p in roles["previous_token"]}


def test_random_baseline():
    first = random_baseline((32, 8), "k", 16, seed=0)
    assert first == random_baseline((32, 8), "k", 16, seed=0)
    assert 0 < first < 1
    # larger residual streams leave random heads further apart
    assert random_baseline((256, 8), "k", 16, seed=0) < first
    with pytest.raises(HeadsError):
        random_baseline((32, 8), "k", 0)


def test_pairs_list_every_cross_layer_pair():
    model = toy_model(words=WORDS, n_layers=3, seed=2)
    scores = composition_scores(model, baseline_samples=2)
    pairs = scores.pairs()
    assert len(pairs) == 3 * model.n_heads ** 2
    row = pairs[0]
    assert (row["writer"], row["reader"]) == ("a0.h0", "a1.h0")
    assert row["k"] == pytest.approx(float(scores.scores["k"][0, 0, 1, 0]))
