"""ROME causal tracing on the real SmolLM2-135M (short prompt, few noise samples)."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import CausalTraceError, TokenizationError
from circuitlab.patching.causal_trace import (
    NOISE_HOOK,
    CausalTracer,
    Restoration,
    kind_variant,
    subject_token_span,
)

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"


@pytest.fixture(scope="module")
def tracer(smollm):
    return CausalTracer(smollm, PROMPT, SUBJECT, TARGET, samples=3, seed=0)


def test_subject_span_and_bad_input(smollm):
    # <|im_start|> The | E iffel Tower | is located in the city of
    assert subject_token_span(smollm, PROMPT, SUBJECT) == (2, 5)
    with pytest.raises(CausalTraceError, match="does not occur"):
        subject_token_span(smollm, PROMPT, "Statue of Liberty")
    with pytest.raises(TokenizationError, match="single token"):
        CausalTracer(smollm, PROMPT, SUBJECT, " Parisian capital", samples=1)


def test_noise_hook_feeds_block_0(smollm):
    _, cache = smollm.bridge.run_with_cache(smollm.to_tokens("Hello world"))
    assert torch.equal(cache[NOISE_HOOK], cache["blocks.0.hook_resid_pre"])


def test_identities_and_fast_path(smollm, tracer):
    L, n, (s0, s1) = smollm.n_layers, tracer.n_pos, tracer.subject_span
    assert tracer.clean_prob > 0.2 and tracer.corrupt_prob < 0.5 * tracer.clean_prob  # the noise must matter
    variants = [
        (),
        (Restoration("embed", 0, tuple(range(s0, s1))),),
        (Restoration("resid", L - 1, (n - 1,)),),
        (Restoration("resid", 12, tuple(range(n))),),
        (Restoration("resid", 3, tuple(range(s0))),),
    ]
    probs = tracer.restored_probs(variants)
    assert probs[0] == pytest.approx(tracer.corrupt_prob, abs=1e-5)
    for p in probs[1:4]:
        assert float(p) == pytest.approx(tracer.clean_prob, abs=1e-4)
    assert probs[4] == pytest.approx(tracer.corrupt_prob, abs=1e-5)
    # The restart-from-layer path equals plain full bridge forwards with the same hooks.
    mixed = [kind_variant("mlp", 4, [3], 10, L), kind_variant("attn", 20, [n - 1], 10, L), (Restoration("resid", 8, (3,)),)]
    torch.testing.assert_close(tracer.restored_probs(mixed), tracer.restored_probs(mixed, fast=False), atol=1e-4, rtol=1e-3)


def test_zero_noise_gives_zero_effect(smollm):
    tracer = CausalTracer(smollm, PROMPT, SUBJECT, TARGET, noise=0.0, samples=1)
    assert tracer.corrupt_prob == pytest.approx(tracer.clean_prob, abs=1e-5)
    assert tracer.trace_layer(5, 3, kind="mlp")["effect"] == pytest.approx(0.0, abs=1e-5)


def test_resid_trace_early_subject_late_last_token(tracer):
    """Measured on SmolLM2 (samples 5 and 10 agree): restoring the residual at the subject token 'iffel' recovers
    most of p(' Paris') up to layer ~22; from layer ~23 on only the last token matters (ROME's early/late sites)."""
    positions = list(range(tracer.subject_span[0], tracer.n_pos))
    grid = tracer.trace("resid", layers=[2, 8, 27, 29], positions=positions)
    gap = tracer.clean_prob - tracer.corrupt_prob
    best = [positions[i] for i in grid.effect.argmax(0).tolist()]
    subject = range(*tracer.subject_span)
    assert best[0] in subject and best[1] in subject
    assert best[2] == best[3] == tracer.n_pos - 1
    assert (grid.effect.max(0).values > 0.5 * gap).all()


def test_mlp_early_at_subject_attention_late_at_last_token(tracer):
    """Measured (samples 5): the MLP window peaks at 'iffel' around layer 2 (AIE 0.33), the attention window
    at the last token around layer 19 (0.44); the other position's effect at those layers is < 0.04."""
    subject, last = 3, tracer.n_pos - 1
    gap = tracer.clean_prob - tracer.corrupt_prob
    mlp = tracer.trace("mlp", layers=[2], positions=[subject, last]).effect[:, 0]
    attn = tracer.trace("attn", layers=[19], positions=[subject, last]).effect[:, 0]
    assert mlp[0] > 0.5 * gap and mlp[1] < 0.25 * gap
    assert attn[1] > 0.5 * gap and attn[0] < 0.25 * gap


def test_subject_noise_is_romes_sigma_on_the_facts_task(smollm):
    """ROME's `collect_embedding_std`, written out independently: every subject of the task tokenized on its
    own by the HF tokenizer (no special tokens), the rows of W_E, all entries pooled, torch's std; sigma = 3x.
    Over all 82 candidate facts this is 0.1162 (the value ROME's definition gives on SmolLM2); over the whole
    vocabulary 0.1356 ("vocab" noise), 1.17x larger."""
    from circuitlab.patching.causal_trace import ROME_NOISE_SCALE, embedding_std, facts_from_task, noise_level
    from circuitlab.tasks.facts import FACTS
    from circuitlab.tasks.registry import make_task

    def rome_std(subjects):
        ids = [i for s in subjects for i in smollm.tokenizer(s, add_special_tokens=False)["input_ids"]]
        return float(smollm.bridge.W_E.detach()[ids].double().std())

    task = make_task("facts", smollm)
    subjects = [f.subject for f in facts_from_task(task)]
    level = noise_level(smollm, "subject", subjects)  # what trace/average uses for the task
    assert ROME_NOISE_SCALE == 3.0 and level.source == "subject"
    # float32 std of ~10^5 entries vs the float64 one: ~1e-6 relative.
    assert level.sigma == pytest.approx(3 * rome_std(subjects), rel=1e-5)
    assert rome_std([f.subject for f in FACTS]) == pytest.approx(0.1162, abs=5e-5)
    assert embedding_std(smollm) == pytest.approx(0.1356, abs=5e-5)


def test_single_prompt_subject_noise_uses_its_subject(smollm, tracer):
    ids = smollm.tokenizer(SUBJECT, add_special_tokens=False)["input_ids"]
    assert tracer.noise.source == "subject"
    assert tracer.sigma == pytest.approx(3 * float(smollm.bridge.W_E.detach()[ids].double().std()), rel=1e-5)
