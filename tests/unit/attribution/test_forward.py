"""Running the bridge for attribution: the answer-position metric and early-stopping capture."""

from __future__ import annotations

import pytest
import torch

from circuitlab.attribution.forward import capture_activation, metric_with_hooks
from circuitlab.errors import AttributionError
from circuitlab.models.hooks import hook_name

from .toys import EXAMPLES, prepared, rounding_bound


@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "kl"])
def test_answer_position_metric_matches_full_logits(toy, metric):
    p = prepared(toy, metric=metric)
    batch = p.single_batch()
    with torch.no_grad():
        fast = metric_with_hooks(toy, batch, p.metric, [])
        logits = toy.logits(batch.clean)
        full = p.metric(logits, batch)
    # Same forward; the unembedding of one position vs all positions may sum in another order. A metric
    # of logits is a difference / log-sum-exp of logits: its rounding scale is max |logit|.
    assert float((fast - full).abs().max()) <= rounding_bound(logits.abs().max())


def test_capture_activation_stops_early_and_matches_cache(toy):
    tokens = toy.to_tokens(EXAMPLES[0].clean)
    name = hook_name("z", 1)
    _, cache = toy.bridge.run_with_cache(tokens, names_filter=name)
    # the same operations on the same inputs up to the hook: bitwise equal
    assert torch.equal(capture_activation(toy, tokens, name), cache[name])
    with pytest.raises(AttributionError, match="does not exist"):
        capture_activation(toy, tokens, "blocks.1.hook_nothing")
