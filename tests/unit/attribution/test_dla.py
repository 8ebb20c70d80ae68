"""Direct logit attribution on toy models: the components rebuild the logit difference."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.dla import ComponentAttribution, direct_logit_attribution, head_output_weights
from circuitlab.models.hooks import hook_name
from circuitlab.models.toy import toy_model
from circuitlab.tasks import Example

from .toys import EPS32, EXAMPLES, ROUNDING, SHORT, WORDS, prepared, rounding_bound


@pytest.mark.parametrize("config", [
    {}, {"normalization_type": "LN"}, {"attn_only": True, "normalization_type": None}, {"n_key_value_heads": 2},
])
def test_dla_components_sum_to_logit_difference(config):
    model = toy_model(words=WORDS, n_layers=2, seed=5, **config)
    p = prepared(model)
    batch = p.single_batch()
    result = direct_logit_attribution(model, batch)
    with torch.no_grad():
        logits = model.logits(batch.clean)
    assert float((result.target - p.metric(logits, batch)).abs().max()) <= rounding_bound(logits.abs().max())
    # sum over components = the logit difference, to the rounding of a sum of those components
    scale = result.values.abs().sum(-1)
    assert bool(((result.total - result.target).abs() <= ROUNDING * EPS32 * scale).all())
    # each head's value splits exactly over the source positions it reads from
    per_source = result.head_by_source.abs().sum(-1).max()
    assert float((result.head_by_source.sum(-1) - result.head_values()).abs().max()) <= rounding_bound(per_source)
    # the projection at the answer position is the by-position table at that position (the same numbers)
    assert torch.equal(result.by_position[torch.arange(batch.size), :, batch.answer_pos], result.values)
    per_layer = result.layer_values()
    at_answer = result.layer_by_position()[:, -1]
    expected = (per_layer["attn"] + per_layer["mlp"]).mean(0)
    assert float((at_answer - expected).abs().max()) <= rounding_bound(scale.max())


def test_components_concat_keeps_every_prompt(toy):
    long, short = prepared(toy).single_batch(), prepared(toy, SHORT).single_batch()
    a, b = direct_logit_attribution(toy, long), direct_logit_attribution(toy, short)
    both = ComponentAttribution.concat([a, b])
    assert both.values.shape[0] == long.size + short.size
    assert torch.equal(both.target, torch.cat([a.target, b.target]))
    assert both.relative_error == max(a.relative_error, b.relative_error)


def test_head_outputs_rebuild_attn_out(toy):
    tokens = toy.to_tokens(EXAMPLES[0].clean)
    _, cache = toy.bridge.run_with_cache(tokens)
    for layer in range(toy.n_layers):
        W_O, b_O = head_output_weights(toy, layer)
        z = cache[hook_name("z", layer)]
        assert z.shape[2] == toy.n_heads  # hook_z is [batch, pos, head, d_head]
        rebuilt = torch.einsum("bphd,hdm->bpm", z, W_O) + b_O
        scale = torch.einsum("bphd,hdm->bpm", z.abs(), W_O.abs()).max() + b_O.abs().max()
        assert float((rebuilt - cache[hook_name("attn_out", layer)]).abs().max()) <= rounding_bound(scale)


def test_dla_without_wrong_answer_is_the_answer_logit(toy):
    p = prepared(toy, [Example(EXAMPLES[0].clean, EXAMPLES[0].corrupt, [" Mary"])])
    batch = p.single_batch()
    result = direct_logit_attribution(toy, batch)
    with torch.no_grad():
        logits = toy.logits(batch.clean)[0, -1]
    answer = float(logits[toy.single_token_id(" Mary")])
    assert abs(float(result.total[0]) - answer) <= rounding_bound(result.values.abs().sum())
