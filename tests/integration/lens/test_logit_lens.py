"""The logit lens on the real SmolLM2-135M (moved from tests/integration/patching/test_trace_and_lens.py).

Tolerances: the lens and the model's forward compute the last depth's logits with the same float32
operations in possibly another order: a few units of eps32 * S, with S = |normed resid| . |W_U| (the
magnitude summed into one logit); for log-probabilities the scale is max |logit|. `ROUNDING` = 16 units.
"""

from __future__ import annotations

import torch
from PIL import Image

from circuitlab.lens import lens_from_resid, logit_lens
from circuitlab.lens.logit_lens import lens_sites
from circuitlab.lens.plots import DPI, MAX_WIDTH_IN, plot_lens

PROMPT, TARGET = "The Eiffel Tower is located in the city of", " Paris"
EPS32 = torch.finfo(torch.float32).eps
ROUNDING = 16


def test_lens_last_layer_is_model_logits(smollm):
    tokens = smollm.to_tokens(PROMPT)
    with torch.no_grad():
        logits = smollm.logits(tokens)[0]
        _, cache = smollm.bridge.run_with_cache(tokens)
        resid = cache[lens_sites(smollm)[-1]][0]
        lens = lens_from_resid(smollm, resid)
        normed = smollm.bridge.ln_final(resid)
        scale = float((normed.abs() @ smollm.bridge.W_U.abs()).max())
    assert float((lens - logits).abs().max()) <= ROUNDING * EPS32 * scale


def test_lens_follows_paris_through_depth(smollm):
    result = logit_lens(smollm, PROMPT, target=TARGET, top_k=5)
    ranks = result.target_rank[:, -1]
    assert result.top_tokens[-1][-1][0] == " Paris" and int(ranks[-1]) == 1
    with torch.no_grad():
        max_logit = float(smollm.logits(smollm.to_tokens(PROMPT)).abs().max())
    assert float(result.kl[-1].abs().max()) <= 1e-9  # KL(final || final) = 0, float64 readout
    assert max_logit > 0
    # ' Paris' is far from the top in the first two thirds of the network and climbs over the last layers.
    assert (ranks[:20] > 100).all()
    assert int(ranks[-6]) > int(ranks[-3]) > int(ranks[-1])


def test_lens_figure_of_a_64_token_prompt_stays_legible(smollm, tmp_path):
    words = ("The Eiffel Tower is located in the city of Paris , which is the capital of France . It was built "
             "for the world fair of 1889 and is one of the most visited monuments in the world . ").split()
    prompt, n = "", 0
    while n < 64:  # grow word by word to exactly 64 tokens (BOS included)
        candidate = (prompt + " " + words[len(prompt.split()) % len(words)]).strip()
        if len(smollm.to_tokens(candidate)[0]) > 64:
            break
        prompt, n = candidate, len(smollm.to_tokens(candidate)[0])
    result = logit_lens(smollm, prompt, top_k=1)
    assert len(result.str_tokens) >= 62
    path = tmp_path / "lens.png"
    plot_lens(result).savefig(path, format="png")
    width, height = Image.open(path).size
    assert width <= MAX_WIDTH_IN * DPI  # was 3,965 px at 32 tokens
    assert height <= 1500


def test_lens_kl_is_float64_accurate(smollm):
    """KL(final || depth) written out by hand in float64 from the lens logits, against the lens (to 1e-6),
    where a float32 log-softmax is off by up to ~1e-3 above ~5 nats (it sums to 1 + 1.2e-5 over 49k tokens)."""
    result = logit_lens(smollm, PROMPT, top_k=1)
    with torch.no_grad():
        _, cache = smollm.bridge.run_with_cache(smollm.to_tokens(PROMPT))
        logits = torch.stack([lens_from_resid(smollm, cache[s][0]) for s in lens_sites(smollm)])
    p_log = logits[-1:].double().log_softmax(-1)
    hand = (p_log.exp() * (p_log - logits.double().log_softmax(-1))).sum(-1)
    assert float((result.kl - hand).abs().max()) <= 1e-6
    assert float(result.kl.max()) > 5  # the regime where float32 went wrong
    p32 = logits[-1:].log_softmax(-1)
    float32 = (p32.exp() * (p32 - logits.log_softmax(-1))).sum(-1)
    assert float((float32.double() - hand).abs().max()) > 1e-5  # the float32 readout would fail the check
