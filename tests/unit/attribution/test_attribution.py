"""Attribution methods on toy models: identities, Captum parity, hand-computed rollout / flow, and the exact
agreement of attribution patching with activation patching where the metric is linear in the site."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl_patching
from captum.attr import LayerIntegratedGradients
from captum.attr._utils.approximation_methods import approximation_parameters
from conftest import TOY_WORDS

from circuitlab.attribution import (
    attention_flow,
    attention_rollout,
    attention_times_gradient,
    attribution_patching,
    capture_activation,
    direct_logit_attribution,
    flow_graph,
    head_output_weights,
    layer_integrated_gradients,
    metric_with_hooks,
    quadrature,
    residual_attention,
    run_attribution,
)
from circuitlab.errors import CircuitlabError
from circuitlab.models.toy import toy_model
from circuitlab.tasks import Example, Task

EXAMPLES = [
    Example("When Mary and John went to the store , John gave a drink to",
            "When Tom and Anna went to the store , Kate gave a drink to", [" Mary"], [" John"]),
    Example("When Tom and Paul went to the store , Paul gave a drink to",
            "When Mary and Anna went to the store , Kate gave a drink to", [" Tom"], [" Paul"]),
    Example("When Kate and Anna went to the store , Anna gave a drink to",
            "When John and Paul went to the store , Mary gave a drink to", [" Kate"], [" Anna"]),
]


def prepared(model, examples=EXAMPLES):
    return Task("toy-ioi", examples).prepare(model)


@pytest.fixture(scope="module")
def linear_toy():
    """Attention-only, no final norm: the metric is linear in the last layer's z, attn_out and resid_post."""
    model = toy_model(words=TOY_WORDS, n_layers=2, attn_only=True, normalization_type=None, seed=3)
    model.bridge.eval()
    return model


# --- forward helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "kl"])
def test_answer_position_metric_matches_full_logits(toy, metric):
    p = Task("toy-ioi", EXAMPLES, metric=metric).prepare(toy)
    batch = p.single_batch()
    with torch.no_grad():
        fast = metric_with_hooks(toy, batch, p.metric, [])
        full = p.metric(toy.logits(batch.clean), batch)
    assert torch.allclose(fast, full, atol=1e-5)


def test_capture_activation_stops_early_and_matches_cache(toy):
    tokens = toy.to_tokens(EXAMPLES[0].clean)
    _, cache = toy.bridge.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    assert torch.equal(capture_activation(toy, tokens, "blocks.1.attn.hook_z"), cache["blocks.1.attn.hook_z"])
    with pytest.raises(CircuitlabError, match="does not exist"):
        capture_activation(toy, tokens, "blocks.1.hook_nothing")


# --- direct logit attribution ------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {}, {"normalization_type": "LN"}, {"attn_only": True, "normalization_type": None}, {"n_key_value_heads": 2},
])
def test_dla_components_sum_to_logit_difference(config):
    model = toy_model(words=TOY_WORDS, n_layers=2, seed=5, **config)
    p = prepared(model)
    batch = p.single_batch()
    result = direct_logit_attribution(model, batch)
    logits = model.logits(batch.clean)
    assert torch.allclose(result.target, p.metric(logits, batch), atol=1e-5)
    assert result.relative_error < 1e-4
    # each head's value splits exactly over the source positions it reads from
    assert torch.allclose(result.head_by_source.sum(-1), result.head_values(), atol=1e-5)
    # the projection at the answer position is the by-position table at that position
    assert torch.allclose(result.by_position[torch.arange(batch.size), :, batch.answer_pos], result.values)
    per_layer = result.layer_values()
    at_answer = result.layer_by_position()[:, -1]
    assert torch.allclose(at_answer, (per_layer["attn"] + per_layer["mlp"]).mean(0), atol=1e-5)


def test_head_outputs_rebuild_attn_out(toy):
    tokens = toy.to_tokens(EXAMPLES[0].clean)
    _, cache = toy.bridge.run_with_cache(tokens)
    for layer in range(toy.n_layers):
        W_O, b_O = head_output_weights(toy, layer)
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape[2] == toy.n_heads  # hook_z is [batch, pos, head, d_head]
        rebuilt = torch.einsum("bphd,hdm->bpm", z, W_O) + b_O
        assert torch.allclose(rebuilt, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-4)


def test_dla_without_wrong_answer_is_the_answer_logit(toy):
    p = prepared(toy, [Example(EXAMPLES[0].clean, EXAMPLES[0].corrupt, [" Mary"])]).with_reference(toy)
    batch = p.single_batch()
    result = direct_logit_attribution(toy, batch)
    with torch.no_grad():
        logits = toy.logits(batch.clean)[0, -1]
    assert float(result.total[0]) == pytest.approx(float(logits[toy.single_token_id(" Mary")]), rel=1e-4)


# --- integrated gradients ----------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"])
def test_quadrature_matches_captum(rule):
    steps_fn, alphas_fn = approximation_parameters(rule)
    alphas, weights = quadrature(rule, 9)
    assert torch.allclose(alphas, torch.tensor(alphas_fn(9), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(weights, torch.tensor(steps_fn(9), dtype=torch.float64), atol=1e-12)


def test_trapezoid_weights_sum_to_one():
    steps_fn, _ = approximation_parameters("riemann_trapezoid")
    _, weights = quadrature("riemann_trapezoid", 8)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert torch.allclose(weights, torch.tensor(steps_fn(8), dtype=torch.float64) * 8 / 7)


def _captum_embedding_ig(model, p, batch, rule, steps):
    def forward(tokens):
        repeated = batch.select(list(range(batch.size)) * (tokens.shape[0] // batch.size))
        return p.metric(model.bridge(tokens), repeated)

    base = torch.full_like(batch.clean, model.tokenizer.pad_token_id)
    base[:, 0] = batch.clean[:, 0]  # BOS kept, as circuitlab does by default
    lig = LayerIntegratedGradients(forward, model.bridge.embed)
    return lig.attribute(batch.clean, baselines=base, n_steps=steps, method=rule).sum(-1)


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"])
def test_embedding_ig_matches_captum(toy, rule):
    p = prepared(toy)
    batch = p.single_batch()
    ours = layer_integrated_gradients(toy, batch, p.metric, baseline="pad", steps=12, rule=rule, chunk_steps=5)
    theirs = _captum_embedding_ig(toy, p, batch, rule, 12)
    if rule == "riemann_trapezoid":
        theirs = theirs * 12 / 11  # Captum's trapezoid weights sum to 1 - 1/n (see quadrature.py)
    assert float((ours.attributions - theirs).abs().max() / theirs.abs().max()) < 1e-4


def test_ig_completeness_and_bos(toy):
    p = prepared(toy)
    batch = p.single_batch()
    result = layer_integrated_gradients(toy, batch, p.metric, baseline="zero", steps=64)
    # absolute gap: the random toy's f(x) - f(x') can be tiny (the 1 % relative bound is tested on SmolLM2)
    assert float(result.completeness_gap.max()) < 0.01
    coarse = layer_integrated_gradients(toy, batch, p.metric, baseline="zero", steps=2)
    assert float(coarse.completeness_gap.max()) > float(result.completeness_gap.max())
    assert torch.allclose(result.f_input, p.metric(toy.logits(batch.clean), batch), atol=1e-5)
    assert bool((result.attributions[:, 0] == 0).all())  # BOS is not interpolated by default
    # (with the zero baseline and BOS interpolated too, every position starts at 0 and the RMSNorm'd model is
    # discontinuous at alpha = 0, so no quadrature converges: a pad baseline is used for this check)
    with_bos = layer_integrated_gradients(toy, batch, p.metric, baseline="pad", steps=64, interpolate_bos=True)
    assert float(with_bos.attributions[:, 0].abs().max()) > 0
    assert float(with_bos.completeness_gap.max()) < 0.01


def test_layer_ig_with_corrupt_baseline_spans_the_patching_effect(toy):
    p = prepared(toy)
    batch = p.single_batch()
    hook = "blocks.1.hook_resid_pre"
    result = layer_integrated_gradients(toy, batch, p.metric, hook=hook, baseline="corrupt", steps=32)
    # f(baseline) = the clean run with that activation (except BOS) taken from the corrupt run
    _, corrupt_cache = toy.bridge.run_with_cache(batch.corrupt, names_filter=hook)

    def patch(act, **_):
        act = act.clone()
        act[:, 1:] = corrupt_cache[hook][:, 1:]
        return act

    patched = p.metric(toy.bridge.run_with_hooks(batch.clean, fwd_hooks=[(hook, patch)]), batch)
    assert torch.allclose(result.f_baseline, patched, atol=1e-5)
    assert float(result.completeness_gap.max()) < 0.01


def test_ig_bad_input(toy):
    p = prepared(toy)
    batch = p.single_batch()
    with pytest.raises(CircuitlabError, match="steps"):
        layer_integrated_gradients(toy, batch, p.metric, steps=0)
    with pytest.raises(CircuitlabError, match="unknown integration rule"):
        layer_integrated_gradients(toy, batch, p.metric, rule="simpson")
    with pytest.raises(CircuitlabError, match="token length"):
        layer_integrated_gradients(toy, batch, p.metric, baseline=batch.clean[:, :-1])
    with pytest.raises(CircuitlabError, match="same shape"):
        layer_integrated_gradients(toy, batch, p.metric, baseline=torch.zeros(batch.size, 3, toy.d_model))
    with pytest.raises(CircuitlabError, match="unknown baseline"):
        layer_integrated_gradients(toy, batch, p.metric, baseline="noise")
    with pytest.raises(CircuitlabError, match="does not exist"):
        layer_integrated_gradients(toy, batch, p.metric, hook="blocks.9.hook_resid_pre")


# --- rollout and flow --------------------------------------------------------------------------------

def test_rollout_matches_hand_computation():
    a1 = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    a2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    patterns = torch.stack([torch.stack([a1, a1]), torch.stack([a2, a2])])  # [layer, head, q, k]
    # A~1 = 0.5 a1 + 0.5 I = [[1, 0], [0.125, 0.875]]; A~2 = [[1, 0], [0.25, 0.75]]
    hand = torch.tensor([[1.0, 0.0], [0.25 + 0.75 * 0.125, 0.75 * 0.875]])
    rollout = attention_rollout(patterns)
    assert torch.allclose(rollout[0], torch.tensor([[1.0, 0.0], [0.125, 0.875]]))
    assert torch.allclose(rollout[1], hand)
    assert torch.allclose(rollout[1].sum(-1), torch.ones(2))


def test_rollout_renormalises_rows_and_averages_heads():
    patterns = torch.tensor([[[[2.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 3.0]]]])  # 1 layer, 2 heads
    mixed = residual_attention(patterns)[0]
    mean = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    expected = 0.5 * mean + 0.5 * torch.eye(2)
    assert torch.allclose(mixed, expected / expected.sum(-1, keepdim=True))


def test_max_flow_on_tiny_graph():
    # One layer, residual 0: A~ = A. Input 0 reaches output 1 directly (0.3) only; input 1 with 0.7.
    patterns = torch.tensor([[[[1.0, 0.0], [0.3, 0.7]]]])
    flow = attention_flow(patterns, target=1, residual=0.0)
    assert flow[0].tolist() == pytest.approx([0.3, 0.7])
    # Two layers, both [[1, 0], [0.5, 0.5]]: input 0 -> (2, 1) via (1, 0) [cap 1 then 0.5] and via (1, 1)
    # [0.5 then 0.5]: max flow = min(1, 0.5) + min(0.5, 0.5) = 1.0; input 1 -> only via (1, 1): 0.5.
    layer = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    two = torch.stack([layer[None], layer[None]])
    flow2 = attention_flow(two, target=1, residual=0.0)
    assert flow2[1].tolist() == pytest.approx([1.0, 0.5])
    assert flow_graph(residual_attention(two, 0.0)).number_of_edges() == 6


def test_flow_bad_input():
    with pytest.raises(CircuitlabError, match="q == k"):
        attention_rollout(torch.zeros(2, 2, 3, 4))
    with pytest.raises(CircuitlabError, match="residual"):
        attention_rollout(torch.ones(1, 1, 2, 2) / 2, residual=2.0)
    with pytest.raises(CircuitlabError, match="out of range"):
        attention_flow(torch.ones(1, 1, 2, 2) / 2, layers=[3])


# --- attention x gradient ----------------------------------------------------------------------------

def test_attention_gradient_matches_finite_difference(toy):
    """Scaling head h's pattern by (1 + t) changes the metric at rate sum_{q,k} A dm/dA (its score)."""
    p = prepared(toy)
    batch = p.single_batch()
    scores = attention_times_gradient(toy, batch, p.metric).scores  # [batch, layer, head, q, k]
    layer, head, eps = 0, 2, 1e-3

    def metric_with_scale(t):
        def scale(act, hook=None):
            act = act.clone()
            act[:, head] = act[:, head] * (1 + t)
            return act

        logits = toy.bridge.run_with_hooks(batch.clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", scale)])
        return p.metric(logits, batch).double()

    with torch.no_grad():
        numeric = (metric_with_scale(eps) - metric_with_scale(-eps)) / (2 * eps)
    analytic = scores[:, layer, head].sum((-1, -2)).double()
    assert torch.allclose(numeric, analytic, rtol=2e-2, atol=1e-4)


# --- attribution patching ----------------------------------------------------------------------------

def test_attribution_patching_exact_where_linear(linear_toy):
    """Last layer of an attention-only model without final norm: the logit difference is linear in z and
    attn_out there, so the first-order estimate equals TransformerLens' activation patching exactly."""
    p = prepared(linear_toy)
    batch = p.single_batch()
    atp = attribution_patching(linear_toy, batch, p.metric, sites=["z", "attn_out", "resid_pre"])
    _, clean_cache = linear_toy.bridge.run_with_cache(batch.clean)

    def normalised_metric(logits):
        return (p.metric(logits, batch).mean() - atp.corrupt_metric) / (atp.clean_metric - atp.corrupt_metric)

    last, n_pos = linear_toy.n_layers - 1, batch.n_pos
    heads = pd.DataFrame([(last, pos, h) for pos in range(n_pos) for h in range(linear_toy.n_heads)],
                         columns=["layer", "pos", "head"])
    real_z = tl_patching.generic_activation_patch(
        linear_toy.bridge, batch.corrupt, clean_cache, normalised_metric,
        tl_patching.layer_pos_head_vector_patch_setter, "z", index_df=heads)
    assert torch.allclose(atp.effects["z"][last].flatten(), real_z, atol=1e-4)
    positions = pd.DataFrame([(last, pos) for pos in range(n_pos)], columns=["layer", "pos"])
    real_attn = tl_patching.generic_activation_patch(
        linear_toy.bridge, batch.corrupt, clean_cache, normalised_metric,
        tl_patching.layer_pos_patch_setter, "attn_out", index_df=positions)
    assert torch.allclose(atp.effects["attn_out"][last], real_attn, atol=1e-4)
    assert float(real_attn.abs().max()) > 0.1  # the check is not vacuous
    assert torch.allclose(atp.head_all_positions(), atp.effects["z"].sum(1))
    assert atp.effects["resid_pre"].shape == (linear_toy.n_layers, n_pos)


def test_attribution_patching_bad_input(toy, toy_attn_only):
    p = prepared(toy)
    with pytest.raises(CircuitlabError, match="unknown attribution-patching site"):
        attribution_patching(toy, p.single_batch(), p.metric, sites=["embed_out"])
    pa = prepared(toy_attn_only)
    with pytest.raises(CircuitlabError, match="attention-only"):
        attribution_patching(toy_attn_only, pa.single_batch(), pa.metric, sites=["mlp_out"])


def test_run_attribution_bad_method(toy, tmp_path):
    with pytest.raises(CircuitlabError, match="unknown attribution method"):
        run_attribution(toy, prepared(toy), "saliency", tmp_path)
    with pytest.raises(CircuitlabError, match="prompt index"):
        run_attribution(toy, prepared(toy), "rollout", tmp_path, prompt=7)


@pytest.mark.parametrize("site, head", [("q", 1), ("k", 0), ("v", 1), ("pattern", 2)])
def test_attribution_patching_head_sites_are_directional_derivatives(site, head):
    """q/k/v/pattern AtP of one head (all positions) = d metric along (clean - corrupt) at the corrupt run."""
    from circuitlab.attribution.attribution_patching import SITES, attribution_patching
    from circuitlab.models.toy import toy_model
    from circuitlab.tasks import Example, Task

    words = "When Mary and John went to the store , John gave a drink to Tom Anna Paul".split()
    model = toy_model(words=words, n_layers=2, n_heads=4, n_key_value_heads=2, seed=3)
    task = Task("t", [
        Example("When Mary and John went to the store , John gave a drink to",
                "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
        Example("When John and Mary went to the store , Mary gave a drink to",
                "When Anna and Tom went to the store , Paul gave a drink to", " John", " Mary"),
    ])
    prepared = task.prepare(model)
    batch = prepared.single_batch()
    atp = attribution_patching(model, batch, prepared.metric, sites=[site])
    layer, eps, name = 1, 1e-3, SITES[site].format(layer=1)
    _, clean_cache = model.bridge.run_with_cache(batch.clean, names_filter=name)
    clean = clean_cache[name]
    head_axis = 1 if site == "pattern" else 2

    def metric_along(t: float) -> float:
        def move(act, **_):
            index = [slice(None)] * act.ndim
            index[head_axis] = head
            act = act.clone()
            act[tuple(index)] = act[tuple(index)] + t * (clean[tuple(index)] - act[tuple(index)])
            return act

        with torch.no_grad():
            logits = model.bridge.run_with_hooks(batch.corrupt, fwd_hooks=[(name, move)])
        return float(prepared.metric(logits, batch).mean())

    derivative = (metric_along(eps) - metric_along(-eps)) / (2 * eps)
    expected = derivative / (atp.clean_metric - atp.corrupt_metric)
    got = float(atp.effects[site][layer, :, head].sum())
    assert abs(expected) > 1e-4  # the check has something to see
    assert got == pytest.approx(expected, rel=0.02, abs=1e-5)
