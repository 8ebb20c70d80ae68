"""Head detectors: TransformerLens parity, the ground-truth models' heads found, chance levels."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import head_detector as tl

from circuitlab.discovery.ground_truth import (
    HANDSET,
    INDUCTION_HEAD,
    PREV_HEAD,
    TRAINED,
    head_roles,
    load_ground_truth,
)
from circuitlab.errors import HeadsError
from circuitlab.heads.detectors import (
    DETECTORS,
    attention_patterns,
    detect_heads,
    detection_pattern,
    detector_scores,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
    uniform_patterns,
)

EPS = torch.finfo(torch.float32).eps
TL_NAMES = {"prev_token": "previous_token_head", "duplicate_token": "duplicate_token_head", "induction": "induction_head"}


@pytest.fixture(scope="module")
def ground_truths():
    return {name: load_ground_truth(name, n=8) for name in (HANDSET, TRAINED)}


@pytest.mark.parametrize("kind", DETECTORS)
def test_detection_patterns_match_transformer_lens(kind):
    # repeats inside the first copy too, so a position can have several targets
    tokens = torch.tensor([[0, 5, 6, 5, 7, 5, 6, 5, 7, 9]])
    ours = detection_pattern(kind, tokens)[0]
    theirs = getattr(tl, f"get_{TL_NAMES[kind]}_detection_pattern")(tokens)
    assert torch.equal(ours, theirs.float())


@pytest.mark.parametrize("kind", DETECTORS)
@pytest.mark.parametrize(("exclude_bos", "exclude_current_token"), [(False, False), (True, False), (True, True)])
def test_scores_match_transformer_lens_detect_head(toy, monkeypatch, kind, exclude_bos, exclude_current_token):
    """rows="all" is TransformerLens' "mul" measure: the same numbers from its detect_head on the bridge
    (which tokenizes the text itself: lend it the toy model's tokenizer, BOS spelled out, and check it gets
    our tokens)."""
    words = "Mary John Tom Anna Paul Kate store drink"
    tokens = toy.to_tokens(f"{words} {words}")
    text = f"{toy.tokenizer.bos_token} {words} {words}"
    monkeypatch.setattr(toy.bridge, "tokenizer", toy.tokenizer, raising=False)
    assert torch.equal(toy.bridge.to_tokens(text), tokens)
    ours = detector_scores(attention_patterns(toy, tokens), detection_pattern(kind, tokens), rows="all",
                           exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
    theirs = tl.detect_head(toy.bridge, text, TL_NAMES[kind], exclude_bos=exclude_bos,
                            exclude_current_token=exclude_current_token, error_measure="mul")
    # each score is a ratio of two sums of at most 17 x 17 probabilities: a few float32 roundings apart
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=0, atol=32 * EPS)


def test_target_rows_equal_the_ground_truth_procedure(toy):
    """On BOS + x + x with distinct x, the "targets" score is the mean attention to the target."""
    tokens = repeated_random_tokens(toy, 7, 3, seed=1)
    patterns = attention_patterns(toy, tokens)
    prev = detector_scores(patterns, detection_pattern("prev_token", tokens))
    induction = detector_scores(patterns, detection_pattern("induction", tokens))
    assert torch.allclose(prev, previous_token_scores(patterns), atol=16 * EPS)
    assert torch.allclose(induction, induction_scores(patterns, 7), atol=16 * EPS)
    # "all" divides by every position: a fixed fraction (rows with a target / rows) of the "targets" score
    every = detector_scores(patterns, detection_pattern("induction", tokens), rows="all")
    assert torch.allclose(every, induction * 7 / 15, atol=16 * EPS)


def test_repeated_random_tokens(toy):
    tokens = repeated_random_tokens(toy, 6, 4, seed=3)
    assert tokens.shape == (4, 13)
    assert (tokens[:, 0] == toy.bos_token_id).all()
    assert torch.equal(tokens[:, 1:7], tokens[:, 7:])
    special = set(toy.tokenizer.all_special_ids)
    for row in tokens[:, 1:7].tolist():
        assert len(set(row)) == 6 and not special & set(row)
    assert torch.equal(tokens, repeated_random_tokens(toy, 6, 4, seed=3))
    assert not torch.equal(tokens, repeated_random_tokens(toy, 6, 4, seed=4))
    with pytest.raises(HeadsError, match="context"):
        repeated_random_tokens(toy, toy.n_ctx, 1)
    with pytest.raises(HeadsError, match="at least one"):
        repeated_random_tokens(toy, 0, 1)


def test_uniform_head_scores():
    """A uniform causal head gives position i a weight 1 / (i + 1) on each earlier position."""
    tokens = torch.tensor([[0, 3, 4, 5, 3, 4, 5]])
    uniform = uniform_patterns(*tokens.shape)
    prev = float(detector_scores(uniform, detection_pattern("prev_token", tokens)))
    assert prev == pytest.approx(sum(1 / (i + 1) for i in range(1, 7)) / 6, abs=8 * EPS)
    induction = float(detector_scores(uniform, detection_pattern("induction", tokens)))
    assert induction == pytest.approx(sum(1 / (i + 1) for i in range(4, 7)) / 3, abs=8 * EPS)


@pytest.mark.parametrize("name", [HANDSET, TRAINED])
def test_ground_truth_heads_top_their_detectors(ground_truths, name):
    model, task, _ = ground_truths[name]
    roles = head_roles(model, task)
    scores = detect_heads(model, n_tokens=8, n_sequences=4, seed=5).scores
    n_heads = model.n_heads
    for kind, role in (("prev_token", "previous_token"), ("induction", "induction")):
        ranked = [divmod(int(i), n_heads) for i in scores[kind].flatten().argsort(descending=True)]
        assert set(ranked[:len(roles[role])]) == set(roles[role]), (kind, ranked, roles)
    if name == HANDSET:
        assert roles == {"previous_token": [PREV_HEAD], "induction": [INDUCTION_HEAD]}
        assert float(scores["prev_token"][PREV_HEAD]) > 0.99 and float(scores["induction"][INDUCTION_HEAD]) > 0.99


def test_bos_attention_on_given_prompts(toy):
    prompts = [toy.to_tokens(["When Mary and John went", "When Tom and Anna went"]), toy.to_tokens("Then Paris")]
    scores = detect_heads(toy, n_tokens=4, n_sequences=2, bos_prompts=prompts, bos_source="task t")
    patterns = [attention_patterns(toy, p) for p in prompts]
    # the mean over every (prompt, position >= 1): 2 x 5 positions, then 1 x 2
    expected = (patterns[0][..., 1:, 0].sum((1, 3)) + patterns[1][..., 1:, 0].sum((1, 3))) / (2 * 5 + 2)
    assert torch.allclose(scores.scores["bos"], expected, atol=16 * EPS)
    assert scores.bos_source == "task t"
    assert scores.uniform["bos"] == pytest.approx((2 * sum(1 / (i + 1) for i in range(1, 6)) + 1 / 2 + 1 / 3) / 12)
