"""ROME causal tracing on toy models: identities, a planted model, the fast path vs full forwards, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_WORDS

from circuitlab.atomic import save_figure_atomically
from circuitlab.errors import CausalTraceError, TaskError, TokenizationError
from circuitlab.models.toy import toy_model
from circuitlab.patching.causal_trace import (
    NOISE_HOOK,
    TOKEN_GROUPS,
    CausalTracer,
    Fact,
    Restoration,
    average_indirect_effect,
    check_aggregate,
    check_noise,
    facts_from_task,
    kind_variant,
    noise_level,
    subject_token_span,
    token_groups,
    window_layers,
)
from circuitlab.patching.plots import plot_average, plot_trace
from circuitlab.tasks.task import Example, Task

PROMPT, SUBJECT, TARGET = "The capital of France is in", "capital of France", "Paris"


@pytest.fixture(scope="module")
def tracer(toy):
    return CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise="vocab", noise_scale=5.0, samples=4, seed=0)


def test_noise_hook_is_the_input_of_block_0(toy):
    tokens = toy.to_tokens(PROMPT)
    _, cache = toy.bridge.run_with_cache(tokens)
    assert torch.equal(cache[NOISE_HOOK], cache["blocks.0.hook_resid_pre"])
    seen = {}

    def shift(x, hook):
        return x + 1.0

    def grab(x, hook):
        seen["resid_pre"] = x.clone()

    toy.bridge.run_with_hooks(tokens, fwd_hooks=[(NOISE_HOOK, shift), ("blocks.0.hook_resid_pre", grab)])
    torch.testing.assert_close(seen["resid_pre"], cache["blocks.0.hook_resid_pre"] + 1.0)


def test_subject_token_span(toy):
    assert subject_token_span(toy, PROMPT, SUBJECT) == (2, 5)  # <bos> The [capital of France] is in
    assert subject_token_span(toy, PROMPT, "France") == (4, 5)
    assert subject_token_span(toy, PROMPT, "apital") == (2, 3)  # mid-token subject: the token holding it
    with pytest.raises(CausalTraceError, match="does not occur in the prompt"):
        subject_token_span(toy, PROMPT, "Germany")
    with pytest.raises(CausalTraceError, match="empty"):
        subject_token_span(toy, PROMPT, " ")


def test_bad_input_raises_clear_errors(toy, tracer):
    with pytest.raises(CausalTraceError, match="does not occur"):
        CausalTracer(toy, PROMPT, "Berlin", TARGET, samples=1)
    with pytest.raises(TokenizationError, match="single token"):
        CausalTracer(toy, PROMPT, SUBJECT, "Paris France", samples=1)
    with pytest.raises(CausalTraceError, match="unknown trace kind"):
        tracer.trace("mlp_out")
    with pytest.raises(CausalTraceError, match="unknown trace kind"):
        tracer.trace_layer(0, -1, kind="heads")
    with pytest.raises(CausalTraceError, match="window"):
        tracer.trace("mlp", window=0)
    with pytest.raises(CausalTraceError, match="samples"):
        CausalTracer(toy, PROMPT, SUBJECT, TARGET, samples=0)
    with pytest.raises(CausalTraceError, match="position"):
        tracer.trace_layer(0, 99)


def test_window_layers_shrink_at_edges():
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(15, 10, 30) == range(10, 20)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(4, 1, 30) == range(4, 5)
    assert window_layers(1, 3, 2) == range(0, 2)


def test_identities(toy, tracer):
    L, n, (s0, s1) = toy.n_layers, tracer.n_pos, tracer.subject_span
    assert abs(tracer.clean_prob - tracer.corrupt_prob) > 1e-3  # the corruption must matter for this to test anything
    variants = [
        (),  # restore nothing
        (Restoration("embed", 0, tuple(range(s0, s1))),),  # the embedding output at the subject
        (Restoration("resid", L - 1, (n - 1,)),),  # the last block's output at the last position
        *[(Restoration("resid", layer, tuple(range(n))),) for layer in range(L)],  # any layer, all positions
        (Restoration("resid", 0, tuple(range(s0))),),  # positions before the subject: unchanged by the noise
    ]
    probs = tracer.restored_probs(variants)
    assert probs[0] == pytest.approx(tracer.corrupt_prob, abs=1e-6)
    for p in probs[1:-1]:
        assert float(p) == pytest.approx(tracer.clean_prob, abs=1e-5)
    assert probs[-1] == pytest.approx(tracer.corrupt_prob, abs=1e-6)
    record = tracer.trace_layer(L - 1, -1)
    assert record["patched_prob"] == pytest.approx(tracer.clean_prob, abs=1e-5)
    assert record["effect"] == pytest.approx(tracer.clean_prob - tracer.corrupt_prob, abs=1e-5)


def test_zero_noise_gives_zero_effect(toy):
    tracer = CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise=0.0, samples=2)
    assert tracer.corrupt_prob == pytest.approx(tracer.clean_prob, abs=1e-6)
    for kind in ("resid", "mlp", "attn"):
        assert tracer.trace(kind, window=2).effect.abs().max() < 1e-6


def test_fast_path_matches_full_forwards(toy, tracer):
    L, n = toy.n_layers, tracer.n_pos
    variants = [
        (), (Restoration("embed", 0, (2, 3)),), (Restoration("resid", 1, (3,)),), (Restoration("resid", 0, (4, 6)),),
        kind_variant("mlp", 1, [4], 10, L), kind_variant("attn", 1, [n - 1], 1, L), kind_variant("attn", 0, [3], 3, L),
        (Restoration("embed", 0, (4,)), Restoration("mlp", 1, (5,))),
    ]
    fast, full = tracer.restored_probs(variants), tracer.restored_probs(variants, fast=False)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)
    assert len(set(torch.round(full, decimals=6).tolist())) > 3  # the variants really differ


def test_batching_does_not_change_results(toy):
    a = CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise=1.0, samples=3, batch_size=3).trace("mlp", window=2)
    b = CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise=1.0, samples=3, batch_size=1000).trace("mlp", window=2)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-6, rtol=1e-5)


def test_seeds(toy):
    a = CausalTracer(toy, PROMPT, SUBJECT, TARGET, samples=3, seed=1)
    b = CausalTracer(toy, PROMPT, SUBJECT, TARGET, samples=3, seed=1)
    c = CausalTracer(toy, PROMPT, SUBJECT, TARGET, samples=3, seed=2)
    assert a.corrupt_prob == b.corrupt_prob != c.corrupt_prob


@pytest.fixture(scope="module")
def planted():
    """A 2-layer model whose layer-0 attention writes nothing: information can only move between positions
    in layer 1. With a one-token subject we can say exactly what every restoration recovers."""
    model = toy_model(words=TOY_WORDS, n_layers=2, seed=3)
    o_proj = model.bridge.blocks[0].attn.o
    with torch.no_grad():
        for param in o_proj.parameters():
            param.zero_()
    return model


def test_planted_model(planted):
    tracer = CausalTracer(planted, "The capital of France is in", "France", "Paris", noise="vocab", noise_scale=10.0,
                          samples=3)
    full = tracer.clean_prob - tracer.corrupt_prob
    assert abs(full) > 1e-3
    subj, last, n = 4, tracer.n_pos - 1, tracer.n_pos
    expected = torch.zeros(n, 2)
    expected[subj, 0] = full  # layer 0 output at the subject: everything downstream recomputed from clean
    expected[last, 1] = full  # last block output at the last position = the clean logits
    # Layer 0 output at other positions, incl. the last: no attention in layer 0, so not touched by the noise.
    torch.testing.assert_close(tracer.trace("resid").effect, expected, atol=1e-5, rtol=0)
    attn = tracer.trace("attn", window=1).effect
    # Layer 1 attention at the last position carries all the subject information to it.
    assert attn[last, 1] == pytest.approx(full, abs=1e-5)
    others = attn.clone()
    others[last, 1] = 0
    assert others.abs().max() < 1e-5  # layer-0 attention outputs are zero, other positions never reach `last`


def test_trace_grid_records_and_plot(tracer, tmp_path):
    grid = tracer.trace("resid")
    records = grid.records()
    assert len(records) == tracer.n_pos * grid.probs.shape[1]
    assert {r["subject"] for r in records if r["pos"] in (2, 3, 4)} == {True}
    assert grid.token_labels()[2:5] == ["capital*", "of*", "France*"]
    peak = grid.peak()
    assert peak["effect"] == pytest.approx(float(grid.effect.max()))
    assert grid.effect[grid.positions.index(peak["pos"]), grid.layers.index(peak["layer"])] == grid.effect.max()
    path = save_figure_atomically(plot_trace(grid), tmp_path / "trace.png")
    assert path.stat().st_size > 1000


def test_token_groups():
    # span [2, 5) in a 9-token prompt
    assert token_groups(2, (2, 5), 9) == ["first subject token"]
    assert token_groups(3, (2, 5), 9) == ["middle subject tokens"]
    assert token_groups(4, (2, 5), 9) == ["last subject token"]
    assert token_groups(5, (2, 5), 9) == ["first subsequent token"]
    assert token_groups(6, (2, 5), 9) == ["further tokens"]
    assert token_groups(8, (2, 5), 9) == ["last token"]
    assert token_groups(1, (2, 5), 9) == []
    assert token_groups(3, (3, 4), 9) == ["first subject token", "last subject token"]


LONG = "The capital of France is in the city of"  # further tokens: in, the, city


def test_average_indirect_effect(toy, tmp_path):
    facts = [Fact(PROMPT, SUBJECT, TARGET), Fact("Paris is the capital of", "Paris", "France")]
    avg = average_indirect_effect(toy, facts, kinds=["resid"], window=2, noise=1.0, samples=2,
                                  aggregate="prompt")["resid"]
    singles = [CausalTracer(toy, f.prompt, f.subject, f.target, noise=1.0, samples=2, seed=i) for i, f in enumerate(facts)]
    gaps = [t.clean_prob - t.corrupt_prob for t in singles]
    last = TOKEN_GROUPS.index("last token")
    # Restoring the last block's output at the last token recovers the clean probability in every prompt.
    assert float(avg.effect[last, -1]) == pytest.approx(sum(gaps) / 2, abs=1e-5)
    # "Paris" is one token (no middle subject tokens); prompt 1 has no token between "is" and the last one.
    assert avg.counts == [2, 1, 2, 2, 1, 2]
    assert len(avg.records()) == len(TOKEN_GROUPS) * toy.n_layers
    assert avg.summary()["sigma"] == 1.0 and avg.summary()["noise"] == "absolute"
    assert save_figure_atomically(plot_average(avg), tmp_path / "aie.png").stat().st_size > 1000


@pytest.mark.parametrize("aggregate", ["token", "prompt"])
def test_aggregate_pools_tokens_or_prompts(toy, aggregate):
    """Hand computation from single-prompt grids: 'further tokens' has 3 tokens in prompt 0 and 2 in prompt 1,
    so pooling tokens (ROME's notebook) and averaging prompts first give different numbers."""
    facts = [Fact(LONG, SUBJECT, TARGET), Fact("Paris is the capital of", "Paris", "France")]
    avg = average_indirect_effect(toy, facts, kinds=["resid"], noise="vocab", samples=2, aggregate=aggregate)["resid"]
    sigma = avg.noise.sigma
    tracers = [CausalTracer(toy, f.prompt, f.subject, f.target, noise=sigma, samples=2, seed=i)
               for i, f in enumerate(facts)]
    grids = [t.trace("resid").effect for t in tracers]
    # Probabilities in float32: a few units of eps32 x the largest probability (batching changes the sums).
    tol = 64 * torch.finfo(torch.float32).eps * max(t.clean_prob for t in tracers)
    further = [grids[0][[6, 7, 8]], grids[1][[3, 4]]]  # [tokens, layer] of the group in each prompt
    if aggregate == "token":
        expected, count = torch.cat(further).mean(0), 5
    else:
        expected, count = (further[0].mean(0) + further[1].mean(0)) / 2, 2
    g = TOKEN_GROUPS.index("further tokens")
    assert avg.counts[g] == count and avg.aggregate == aggregate
    torch.testing.assert_close(avg.effect[g], expected, atol=tol, rtol=0)
    assert float((torch.cat(further).mean(0) - (further[0].mean(0) + further[1].mean(0)) / 2).abs().max()) > 10 * tol


def _independent_std(model, subjects):
    """ROME's collect_embedding_std written out: each subject tokenized alone (no special tokens), rows of
    W_E, every entry pooled, torch's (unbiased) std."""
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    return float(model.bridge.W_E.detach()[ids].double().std())


def test_noise_levels(toy):
    subject = CausalTracer(toy, PROMPT, SUBJECT, TARGET, samples=1)  # default: ROME's subject noise
    assert subject.noise.source == "subject" and subject.noise.scale == 3.0
    assert subject.sigma == pytest.approx(3 * _independent_std(toy, [SUBJECT]), rel=1e-6)
    vocab = CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise="vocab", samples=1)
    assert vocab.sigma == pytest.approx(3 * float(toy.bridge.W_E.detach().double().std()), rel=1e-6)
    absolute = CausalTracer(toy, PROMPT, SUBJECT, TARGET, noise=0.25, samples=1)
    assert absolute.sigma == 0.25 and absolute.noise.summary() == {"noise": "absolute", "noise_std": None,
                                                                   "noise_scale": None, "sigma": 0.25}
    # The noise drawn has that scale: std of the 1 x 3 x 32 draws within a few standard errors of sigma.
    draws = absolute.noise_values
    assert float(draws.std()) == pytest.approx(0.25, rel=5 / (2 * draws.numel()) ** 0.5)
    facts = [Fact(PROMPT, SUBJECT, TARGET), Fact("Paris is the capital of", "Paris", "France")]
    level = noise_level(toy, "subject", [f.subject for f in facts], scale=2.0)
    assert level.sigma == pytest.approx(2 * _independent_std(toy, [SUBJECT, "Paris"]), rel=1e-6)


@pytest.mark.parametrize("noise, scale, message", [
    ("gaussian", 3.0, "noise must be 'subject'"),
    (-1.0, 3.0, "finite number >= 0"),
    (float("nan"), 3.0, "finite number >= 0"),
    ("subject", -2.0, "noise scale must be"),
    (0.5, 2.0, "numeric --noise is sigma itself"),
])
def test_bad_noise(noise, scale, message):
    with pytest.raises(CausalTraceError, match=message):
        check_noise(noise, scale)


def test_numeric_noise_strings_are_numbers():
    assert check_noise("0.3") == 0.3 and check_noise("subject") == "subject" and check_noise(2) == 2.0
    with pytest.raises(CausalTraceError, match="aggregate"):
        check_aggregate("layer")


def test_facts_from_task_needs_subject():
    good = Task("f", [Example(PROMPT, PROMPT, ["Paris"], meta={"subject": SUBJECT})])
    assert facts_from_task(good) == [Fact(PROMPT, SUBJECT, "Paris")]
    with pytest.raises(TaskError, match="subject"):
        facts_from_task(Task("f", [Example(PROMPT, PROMPT, ["Paris"])]))
