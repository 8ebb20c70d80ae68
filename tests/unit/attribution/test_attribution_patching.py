"""Attribution patching on toy models: exact where the metric is linear in the site (against
TransformerLens' activation patching), and a float64 directional derivative for the per-head sites."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tl_patching

from circuitlab.attribution.attribution_patching import HEAD_SITES, attribution_patching, check_sites
from circuitlab.errors import AttributionError
from circuitlab.models.hooks import PATCHABLE_SITES, hook_name
from circuitlab.models.toy import toy_model
from circuitlab.tasks import Example, Task

from .toys import EPS64, WORDS, prepared, rounding_bound, toy64


@pytest.fixture(scope="module")
def linear_toy():
    """Attention-only, no final norm: the metric is linear in the last layer's z, attn_out and resid_post."""
    model = toy_model(words=WORDS, n_layers=2, attn_only=True, normalization_type=None, seed=3)
    model.bridge.eval()
    return model


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_exact_where_linear(linear_toy, direction):
    """Last layer of an attention-only model without final norm: the logit difference is linear in z and
    attn_out there, so the first-order estimate equals TransformerLens' activation patching exactly, in the
    same direction: denoise runs the corrupt prompts with clean values, noise the clean with corrupt ones."""
    p = prepared(linear_toy)
    batch = p.single_batch()
    atp = attribution_patching(linear_toy, batch, p.metric, sites=["z", "attn_out", "resid_pre"], direction=direction)
    assert atp.direction == direction
    receiving, donor = (batch.corrupt, batch.clean) if direction == "denoise" else (batch.clean, batch.corrupt)
    _, donor_cache = linear_toy.bridge.run_with_cache(donor)
    with torch.no_grad():
        logits = linear_toy.logits(batch.clean)
    # Both sides are float32 metrics of logits (rounding scale max |logit|) divided by clean - corrupt.
    bound = rounding_bound(logits.abs().max()) / abs(atp.clean_metric - atp.corrupt_metric)

    def normalised_metric(logits):
        return (p.metric(logits, batch).mean() - atp.corrupt_metric) / (atp.clean_metric - atp.corrupt_metric)

    last, n_pos = linear_toy.n_layers - 1, batch.n_pos
    heads = pd.DataFrame([(last, pos, h) for pos in range(n_pos) for h in range(linear_toy.n_heads)],
                         columns=["layer", "pos", "head"])
    real_z = tl_patching.generic_activation_patch(
        linear_toy.bridge, receiving, donor_cache, normalised_metric,
        tl_patching.layer_pos_head_vector_patch_setter, "z", index_df=heads)
    assert float((atp.effects["z"][last].flatten() - real_z).abs().max()) <= bound
    positions = pd.DataFrame([(last, pos) for pos in range(n_pos)], columns=["layer", "pos"])
    real_attn = tl_patching.generic_activation_patch(
        linear_toy.bridge, receiving, donor_cache, normalised_metric,
        tl_patching.layer_pos_patch_setter, "attn_out", index_df=positions)
    assert float((atp.effects["attn_out"][last] - real_attn).abs().max()) <= bound
    assert float((real_attn - atp.baseline).abs().max()) > 1e3 * bound  # the check is not vacuous
    # A head at every position: the changes add (exact here, the metric being linear in z).
    changes = atp.effects["z"] - atp.baseline
    torch.testing.assert_close(atp.head_all_positions(), atp.baseline + changes.sum(1), rtol=0, atol=0)
    assert atp.effects["resid_pre"].shape == (linear_toy.n_layers, n_pos)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_tracks_real_patching_in_its_direction(toy, direction):
    """On a random 2-layer toy (RMSNorm, MLPs: far from linear) each direction tracks real activation
    patching in the same direction (TransformerLens' patching functions) for mlp_out by layer and position
    and z per head at all positions, and runs against the other direction (measured: same 0.99 / 0.90-0.92,
    crossed -0.98 / -0.88 to -0.91). resid_pre and attn_out patches are large on this toy (|value| up to
    1.7) and correlate 0.4-0.8 only."""
    p = prepared(toy)
    batch = p.single_batch()
    atp = attribution_patching(toy, batch, p.metric, sites=["mlp_out", "z"], direction=direction)

    def normalised_metric(logits):
        return (p.metric(logits, batch).mean() - atp.corrupt_metric) / (atp.clean_metric - atp.corrupt_metric)

    def real(d: str) -> dict[str, torch.Tensor]:
        receiving, donor = (batch.corrupt, batch.clean) if d == "denoise" else (batch.clean, batch.corrupt)
        with torch.no_grad():
            _, cache = toy.bridge.run_with_cache(donor)
            return {"mlp_out": tl_patching.get_act_patch_mlp_out(toy.bridge, receiving, cache, normalised_metric),
                    "z": tl_patching.get_act_patch_attn_head_out_all_pos(toy.bridge, receiving, cache,
                                                                         normalised_metric)}

    same, crossed = real(direction), real("noise" if direction == "denoise" else "denoise")
    for site, estimate in (("mlp_out", atp.effects["mlp_out"]), ("z", atp.head_all_positions())):
        r_same = float(torch.corrcoef(torch.stack([estimate.flatten(), same[site].flatten()]))[0, 1])
        r_crossed = float(torch.corrcoef(torch.stack([estimate.flatten(), crossed[site].flatten()]))[0, 1])
        assert r_same > 0.85 and r_crossed < 0, (site, r_same, r_crossed)


def test_attribution_patching_bad_input(toy, toy_attn_only):
    p = prepared(toy)
    with pytest.raises(AttributionError, match="unknown attribution-patching site 'embed_out'"):
        attribution_patching(toy, p.single_batch(), p.metric, sites=["embed_out"])
    pa = prepared(toy_attn_only)
    with pytest.raises(AttributionError, match="attention-only"):
        attribution_patching(toy_attn_only, pa.single_batch(), pa.metric, sites=["mlp_out"])
    with pytest.raises(AttributionError, match="more than once"):
        check_sites(["z", "z"])
    with pytest.raises(AttributionError, match="at least one site"):
        check_sites([])
    assert check_sites(list(PATCHABLE_SITES)) == PATCHABLE_SITES  # every patchable site is offered
    assert set(HEAD_SITES) == {"z", "q", "k", "v", "pattern"}


# Central difference on the float64 toy (see toys.toy64): truncation h^2 |m'''| / 6 ~ 1e-9 at h = 1e-4
# with |m'''| = O(1), rounding eps64 |m| / h ~ 1e-12; the effects are float64 autograd. REL = 1e-6.
H, REL = 1e-4, 1e-6


@pytest.mark.parametrize("site, head", [("q", 1), ("k", 0), ("v", 1), ("pattern", 2)])
def test_attribution_patching_head_sites_are_directional_derivatives(site, head):
    """q/k/v/pattern AtP of one head (all positions) = d metric along (clean - corrupt) at the corrupt run."""
    model = toy64(n_layers=2, n_heads=4, n_key_value_heads=2, seed=3)
    task = Task("t", [
        Example("When Mary and John went to the store , John gave a drink to",
                "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
        Example("When John and Mary went to the store , Mary gave a drink to",
                "When Anna and Tom went to the store , Paul gave a drink to", " John", " Mary"),
    ])
    p = task.prepare(model)
    batch = p.single_batch()
    atp = attribution_patching(model, batch, p.metric, sites=[site])
    layer = 1
    name = hook_name(site, layer)
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
        return float(p.metric(logits, batch).mean())

    derivative = (metric_along(H) - metric_along(-H)) / (2 * H)
    expected = derivative / (atp.clean_metric - atp.corrupt_metric)
    got = float(atp.effects[site][layer, :, head].sum())
    assert abs(expected) > 1e6 * EPS64  # the check has something to see
    assert got == pytest.approx(expected, rel=REL, abs=1e3 * EPS64)
