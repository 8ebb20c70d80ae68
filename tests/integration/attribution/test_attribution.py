"""Attribution on the real SmolLM2-135M (IOI, one template, few prompts): DLA identity, IG completeness and
Captum parity, attention x gradient and attribution patching against finite differences."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerIntegratedGradients

from circuitlab.attribution import (
    attention_patterns,
    attention_rollout,
    attention_times_gradient,
    attribution_patching,
    direct_logit_attribution,
    head_output_weights,
    layer_integrated_gradients,
    metric_with_hooks,
)
from circuitlab.tasks import make_task


@pytest.fixture(scope="module")
def ioi(smollm):
    prepared = make_task("ioi", smollm, n=4, templates=[0]).prepare(smollm)
    return prepared, prepared.single_batch()


def test_answer_position_metric_matches_full_logits(smollm, ioi):
    prepared, batch = ioi
    with torch.no_grad():
        fast = metric_with_hooks(smollm, batch, prepared.metric, [])
        full = prepared.metric(smollm.logits(batch.clean), batch)
    assert torch.allclose(fast, full, atol=1e-4)


def test_head_outputs_rebuild_attn_out(smollm, ioi):
    _, batch = ioi
    _, cache = smollm.bridge.run_with_cache(batch.clean[:2])
    for layer in (0, 14, 29):
        W_O, b_O = head_output_weights(smollm, layer)
        assert b_O is None and W_O.shape == (9, 64, 576)
        rebuilt = torch.einsum("bphd,hdm->bpm", cache[f"blocks.{layer}.attn.hook_z"], W_O)
        assert torch.allclose(rebuilt, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-4)


def test_dla_sums_to_logit_difference(smollm, ioi):
    prepared, batch = ioi
    result = direct_logit_attribution(smollm, batch)
    with torch.no_grad():
        metric = prepared.metric(smollm.logits(batch.clean), batch)
    assert torch.allclose(result.target, metric, atol=1e-4)
    assert result.relative_error <= 1e-3
    assert float(result.target.mean()) > 0  # SmolLM2 solves these IOI prompts
    assert torch.allclose(result.head_by_source.sum(-1), result.head_values(), atol=1e-4)


def test_ig_completeness_at_64_steps(smollm, ioi):
    prepared, batch = ioi
    two = batch.select([0, 1])
    result = layer_integrated_gradients(smollm, two, prepared.metric, baseline="corrupt", steps=64)
    gap = result.relative_gap
    assert float(gap.max()) <= 0.01, gap
    assert bool((result.attributions[:, 0] == 0).all())


def test_ig_matches_captum(smollm, ioi):
    prepared, batch = ioi
    two = batch.select([0, 1])
    ours = layer_integrated_gradients(smollm, two, prepared.metric, baseline="corrupt", steps=4, rule="riemann_middle")

    def forward(tokens):
        repeated = two.select(list(range(two.size)) * (tokens.shape[0] // two.size))
        return prepared.metric(smollm.bridge(tokens), repeated)

    base = two.corrupt.clone()
    base[:, 0] = two.clean[:, 0]
    theirs = LayerIntegratedGradients(forward, smollm.bridge.embed).attribute(
        two.clean, baselines=base, n_steps=4, method="riemann_middle").sum(-1)
    assert float((ours.attributions - theirs).abs().max() / theirs.abs().max()) <= 1e-4


def test_attention_gradient_matches_finite_difference(smollm, ioi):
    prepared, batch = ioi
    one = batch.select([0])
    scores = attention_times_gradient(smollm, one, prepared.metric).scores
    layer, head, eps = 20, 4, 1e-3

    def metric_with_scale(t):
        def scale(act, **_):
            act = act.clone()
            act[:, head] = act[:, head] * (1 + t)
            return act

        with torch.no_grad():
            logits = smollm.bridge.run_with_hooks(one.clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", scale)])
        return float(prepared.metric(logits, one)[0])

    numeric = (metric_with_scale(eps) - metric_with_scale(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float(scores[0, layer, head].sum()), rel=0.05, abs=1e-3)


def test_attribution_patching_matches_directional_derivative(smollm, ioi):
    """The AtP value of a site is the derivative of the metric along (clean - corrupt) at the corrupt run."""
    prepared, batch = ioi
    atp = attribution_patching(smollm, batch, prepared.metric, sites=["z", "resid_pre"])
    layer, head, eps = 12, 3, 1e-2
    _, clean_cache = smollm.bridge.run_with_cache(batch.clean, names_filter=f"blocks.{layer}.attn.hook_z")
    clean_z = clean_cache[f"blocks.{layer}.attn.hook_z"]

    def metric_along(t):
        def move(act, **_):
            act = act.clone()
            act[:, :, head] = act[:, :, head] + t * (clean_z[:, :, head] - act[:, :, head])
            return act

        with torch.no_grad():
            logits = smollm.bridge.run_with_hooks(batch.corrupt, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", move)])
        return float(prepared.metric(logits, batch).mean())

    derivative = (metric_along(eps) - metric_along(-eps)) / (2 * eps)
    normalised = derivative / (atp.clean_metric - atp.corrupt_metric)
    assert float(atp.head_all_positions()[layer, head]) == pytest.approx(normalised, rel=0.02, abs=1e-4)
    # resid_pre at layer 0, summed over positions, patches the whole input: first order of effect 1
    assert atp.effects["resid_pre"].shape == (smollm.n_layers, batch.n_pos)


def test_rollout_rows_are_distributions(smollm, ioi):
    _, batch = ioi
    rollout = attention_rollout(attention_patterns(smollm, batch.clean[:1])[0])
    assert rollout.shape == (smollm.n_layers, batch.n_pos, batch.n_pos)
    assert torch.allclose(rollout.sum(-1), torch.ones(smollm.n_layers, batch.n_pos), atol=1e-5)
    assert bool((rollout.triu(1) == 0).all())  # causal: no flow from later tokens
