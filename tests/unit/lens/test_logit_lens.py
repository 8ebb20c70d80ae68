"""Logit lens on a toy model: the final norm is a pure RMSNorm, the last depth equals the model's logits,
and the lens equals an independent computation from the weights.

Tolerances: two float32 computations of one quantity that differ only in their order of operations agree
to a few units of eps32 * S, S the magnitude of what is summed (for logits: |normed resid| . |W_U| + |b_U|;
for log-probabilities: max |logit|, the scale of log-sum-exp). Measured: <= 2 units; `ROUNDING` = 16.
"""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import LensError, TokenizationError
from circuitlab.lens import lens_from_resid, logit_lens
from circuitlab.lens.logit_lens import lens_sites
from circuitlab.models.hooks import hook_name

PROMPT = "When Mary and John went to the store , John gave a drink to"
EPS32 = torch.finfo(torch.float32).eps
ROUNDING = 16


def bound(scale: torch.Tensor | float) -> float:
    return ROUNDING * EPS32 * float(scale)


def _rms_norm_oracle(model, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) * w with the final norm's own weight and epsilon."""
    norm = model.bridge.ln_final._original_component
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def _unembed_scale(model, normed: torch.Tensor) -> torch.Tensor:
    """|normed| . |W_U| + |b_U|: the magnitude summed into each logit."""
    return (normed.abs() @ model.bridge.W_U.abs() + model.bridge.b_U.abs()).max()


def test_ln_final_is_a_pure_rms_norm(toy):
    x = torch.randn(3, 5, toy.d_model) * 4
    with torch.no_grad():
        first = toy.bridge.ln_final(x)
        oracle = _rms_norm_oracle(toy, x)
        # a mean of squares, a rsqrt and two products: a few rounding units relative to each output
        torch.testing.assert_close(first, oracle, rtol=ROUNDING * EPS32, atol=bound(oracle.abs().max()))
        toy.bridge.ln_final(torch.randn(7, 2, toy.d_model))  # another call in between changes nothing:
        torch.testing.assert_close(toy.bridge.ln_final(x), first, atol=0, rtol=0)  # same op, same input
        torch.testing.assert_close(toy.bridge.ln_final(x[1:2]), first[1:2], rtol=ROUNDING * EPS32,
                                   atol=bound(oracle.abs().max()))  # per row (a smaller batch may vectorise otherwise)


def test_lens_equals_weights_oracle(toy):
    tokens = toy.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = toy.bridge.run_with_cache(tokens)
        resid = cache[hook_name("resid_pre", 1)][0]
        normed = _rms_norm_oracle(toy, resid)
        oracle = normed @ toy.bridge.W_U + toy.bridge.b_U
        assert float((lens_from_resid(toy, resid) - oracle).abs().max()) <= bound(_unembed_scale(toy, normed))


def test_last_depth_equals_model_logits(toy):
    tokens = toy.to_tokens(PROMPT)
    result = logit_lens(toy, PROMPT, top_k=5)
    with torch.no_grad():
        logits = toy.logits(tokens)[0]
        _, cache = toy.bridge.run_with_cache(tokens)
        resid = cache[lens_sites(toy)[-1]][0]
        lens = lens_from_resid(toy, resid)
        scale = _unembed_scale(toy, _rms_norm_oracle(toy, resid))
    assert float((lens - logits).abs().max()) <= bound(scale)
    probs, ids = torch.softmax(logits.double(), -1).topk(5, -1)
    assert torch.equal(result.top_ids[-1], ids)
    assert result.top_probs.dtype == result.kl.dtype == torch.float64  # the readout is float64
    # The lens and model logits differ by float32 rounding (scale max |l|); p moves by p (<= 1) times that.
    log_scale = logits.abs().max()
    torch.testing.assert_close(result.top_probs[-1], probs, rtol=0, atol=bound(log_scale))
    # KL(final || final): the same logits on both sides, so 0 up to float64 rounding.
    assert float(result.kl[-1].abs().max()) <= 1e-9


def test_lens_result_consistency(toy):
    result = logit_lens(toy, PROMPT, target="Mary", top_k=4)
    n_depth, n_pos = toy.n_layers + 1, len(toy.to_tokens(PROMPT)[0])
    assert result.top_ids.shape == (n_depth, n_pos, 4)
    assert lens_sites(toy) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert (result.top_probs[..., :-1] >= result.top_probs[..., 1:]).all()
    with torch.no_grad():
        _, cache = toy.bridge.run_with_cache(toy.to_tokens(PROMPT))
        log_scale = max(float(lens_from_resid(toy, cache[s][0]).abs().max()) for s in lens_sites(toy))
    assert bool((result.kl >= -bound(log_scale)).all())  # KL >= 0 up to log-prob rounding
    mary = toy.single_token_id("Mary")
    is_top1 = result.top_ids[..., 0] == mary
    assert torch.equal(result.target_rank == 1, is_top1)
    torch.testing.assert_close(result.target_prob[is_top1], result.top_probs[..., 0][is_top1], rtol=0, atol=0)
    in_top4 = (result.top_ids == mary).any(-1)
    assert torch.equal(result.target_rank <= 4, in_top4)
    records = result.records()
    assert len(records) == n_depth * n_pos
    assert {"layer", "pos", "token", "top1", "top1_prob", "target_rank", "target_prob", "kl_final", "top"} <= set(records[0])
    assert result.summary()["target"] == "Mary"
    assert set(result.figures()) == {"lens.png"}


def test_bad_input(toy):
    with pytest.raises(LensError, match="top_k"):
        logit_lens(toy, PROMPT, top_k=0)
    with pytest.raises(TokenizationError, match="single token"):
        logit_lens(toy, PROMPT, target="Mary John")


def test_kl_is_float64_and_matches_a_hand_computation(toy):
    """KL(final || depth d) against the formula written out in float64 from the lens logits."""
    from circuitlab.lens.logit_lens import kl_divergence

    result = logit_lens(toy, PROMPT, top_k=1)
    with torch.no_grad():
        _, cache = toy.bridge.run_with_cache(toy.to_tokens(PROMPT))
        final = lens_from_resid(toy, cache[lens_sites(toy)[-1]][0]).double()
        first = lens_from_resid(toy, cache[lens_sites(toy)[0]][0]).double()
    p_log = final - torch.logsumexp(final, -1, keepdim=True)
    q_log = first - torch.logsumexp(first, -1, keepdim=True)
    hand = (p_log.exp() * (p_log - q_log)).sum(-1)
    torch.testing.assert_close(result.kl[0], hand, rtol=0, atol=1e-6)
    assert float(kl_divergence(q_log, q_log).abs().max()) <= 1e-9
