"""Head analysis on SmolLM2-135M: induction heads well above chance, TransformerLens parity on the bridge."""

from __future__ import annotations

import torch
from transformer_lens.head_detector import detect_head

from circuitlab.heads.detectors import (
    attention_patterns,
    detect_heads,
    detection_pattern,
    detector_scores,
    repeated_random_tokens,
)

EPS = torch.finfo(torch.float32).eps


def test_smollm_has_induction_heads(smollm):
    scores = detect_heads(smollm, n_tokens=10, n_sequences=2, seed=0)
    induction, chance = scores.scores["induction"], scores.uniform["induction"]
    # seed 0: a18.h6 0.54, a17.h4 0.48, a17.h5 0.41 against 0.063 for a uniform head
    top = induction.flatten().topk(3).values
    assert float(top[-1]) > 5 * chance and float(top[0]) > 0.4
    assert int(induction.flatten().argmax()) // smollm.n_heads >= smollm.n_layers // 3  # not an early layer
    assert float(scores.scores["bos"].max()) > 0.9  # attention sinks


def test_smollm_scores_match_transformer_lens_detect_head(smollm):
    tokens = repeated_random_tokens(smollm, 6, 1, seed=1)
    text = smollm.decode(tokens[0, 1:])
    assert torch.equal(smollm.bridge.to_tokens(text), tokens)  # the bridge prepends the same BOS
    patterns = attention_patterns(smollm, tokens)
    ours = detector_scores(patterns, detection_pattern("induction", tokens), rows="all")
    theirs = detect_head(smollm.bridge, text, "induction_head")
    assert torch.allclose(ours, theirs.to(ours.dtype), rtol=0, atol=32 * EPS)
