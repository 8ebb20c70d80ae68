"""Activation patching on the real SmolLM2: restart == full forward, prefix reuse == plain restart, parity with
transformer_lens.patching for every site it covers (a few cells each), and where the IOI signal sits."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl

from circuitlab.patching import ActivationPatcher
from circuitlab.patching.prefix import prefix_reuse
from circuitlab.patching.restart import LayerRestart
from circuitlab.tasks import make_task

EPS = torch.finfo(torch.float32).eps
S2_POS, FINAL_POS = 10, 14  # IOI template 0: "<bos> When A and B went to the PLACE , S2 gave a OBJECT to"


@pytest.fixture(scope="module")
def ioi(smollm):
    return make_task("ioi", smollm, n=4, templates=[0]).prepare(smollm)


@pytest.fixture(scope="module")
def tol(smollm, ioi):
    """Two float32 computations of one forward that group their sums differently (restart, prefix reuse, other
    batch shapes, TransformerLens' hooks) differ by a few eps of the logits per layer; 64 eps of the largest
    clean logit (~1e-4 here) covers the 30 layers and is far below the patch effects the tests require."""
    with torch.no_grad():
        logits = smollm.bridge(ioi.single_batch().clean, return_type="logits")
    return 64 * EPS * max(1.0, float(logits.abs().max()))


def test_restart_equals_full_forward_smollm(smollm, ioi, tol):
    batch = ioi.single_batch()
    restart = LayerRestart(smollm)
    with torch.no_grad(), restart.capture():
        full, cache = smollm.bridge.run_with_cache(batch.corrupt, names_filter=lambda n: n.endswith("hook_resid_pre"))
    rows = torch.tensor([0, 1, 2, 3, 3, 0])
    with torch.no_grad():
        for layer in (0, 13, 29):
            out = restart.run(layer, cache[f"blocks.{layer}.hook_resid_pre"][rows])
            assert (out - full[rows]).abs().max() <= tol
    assert (full[0] - full[1]).abs().max() > 1000 * tol  # the prompts' logits differ far beyond it


# site, granularity, TL function, TL axes, TL index rows (a few cells per site keeps this test short; each
# cell moves the metric by > 10x the tolerance, measured with n=2, so a patcher that did nothing would fail)
CASES = [
    ("resid_pre", "layer,pos", tl.get_act_patch_resid_pre, ("layer", "pos"), [(20, 14)]),
    ("resid_mid", "layer,pos", tl.get_act_patch_resid_mid, ("layer", "pos"), [(3, 10)]),
    ("attn_out", "layer,pos", tl.get_act_patch_attn_out, ("layer", "pos"), [(5, 10)]),
    ("mlp_out", "layer,pos", tl.get_act_patch_mlp_out, ("layer", "pos"), [(22, 14)]),
    ("z", "layer,head,pos", tl.get_act_patch_attn_head_out_by_pos, ("layer", "pos", "head"), [(20, 14, 0)]),
    ("q", "layer,head,pos", tl.get_act_patch_attn_head_q_by_pos, ("layer", "pos", "head"), [(20, 14, 2)]),
    ("k", "layer,head,pos", tl.get_act_patch_attn_head_k_by_pos, ("layer", "pos", "head"), [(15, 10, 2)]),
    ("v", "layer,head,pos", tl.get_act_patch_attn_head_v_by_pos, ("layer", "pos", "head"), [(15, 10, 2)]),
    ("pattern", "layer,head,pos", tl.get_act_patch_attn_head_pattern_by_pos, ("layer", "head", "pos"), [(20, 2, 14)]),
    ("z", "layer,head", tl.get_act_patch_attn_head_out_all_pos, ("layer", "head"), [(25, 2)]),
    ("q", "layer,head", tl.get_act_patch_attn_head_q_all_pos, ("layer", "head"), [(20, 1)]),
    ("k", "layer,head", tl.get_act_patch_attn_head_k_all_pos, ("layer", "head"), [(15, 2)]),
    ("v", "layer,head", tl.get_act_patch_attn_head_v_all_pos, ("layer", "head"), [(15, 2)]),
    ("pattern", "layer,head", tl.get_act_patch_attn_head_pattern_all_pos, ("layer", "head"), [(20, 1)]),
]


def test_matches_transformer_lens_on_smollm(smollm, tol):
    prepared = make_task("ioi", smollm, n=2, templates=[0]).prepare(smollm)
    batch = prepared.single_batch()
    patcher = ActivationPatcher(smollm, prepared, progress=False, sites=tuple({case[0] for case in CASES}))
    with torch.no_grad():
        _, clean_cache = smollm.bridge.run_with_cache(batch.clean)
    for site, by, fn, axes, rows in CASES:
        index = pd.DataFrame(rows, columns=list(axes))
        with torch.no_grad():
            theirs = fn(smollm.bridge, batch.corrupt, clean_cache, lambda logits: prepared.metric(logits, batch).mean(),
                        index_axis_names=None, index_df=index)
        for row, cell_index in enumerate(rows):
            cell = dict(zip(axes, cell_index, strict=True))
            ours = patcher.sweep(site, by, layers=[cell["layer"]], positions=[cell["pos"]] if "pos" in cell else None,
                                 heads=[cell["head"]] if "head" in cell else None)
            assert float(ours.mean()[0]) == pytest.approx(float(theirs[row]), abs=tol), (site, by, cell_index)
            effect = abs(float(ours.mean()[0] - ours.corrupt.mean()))
            assert effect > 10 * tol, (site, by, cell_index, effect)  # each cell moves the metric: parity can fail


def test_prefix_reuse_equals_plain_restart_on_smollm(smollm, tol):
    assert prefix_reuse(smollm).ok  # SmolLM2 passes the one-time causality check
    prepared = make_task("ioi", smollm, n=2, templates=[0]).prepare(smollm)
    cells = {"layers": [22], "positions": [S2_POS, FINAL_POS]}
    for site in ("resid_pre", "attn_out", "mlp_out", "z"):
        plain = ActivationPatcher(smollm, prepared, progress=False, prefix=False).sweep(site, "layer,pos", **cells)
        fast = ActivationPatcher(smollm, prepared, progress=False).sweep(site, "layer,pos", **cells)
        assert fast.stats["prefix_reuse"] == "on" and fast.stats["suffix_rows"] == fast.stats["rows"] == 4
        assert (fast.values - plain.values).abs().max() <= tol, site
        assert (plain.values - plain.corrupt).abs().max() > 100 * tol, site  # the patches move the metric
    # a tiny memory budget: one row per forward, the same numbers
    tiny = ActivationPatcher(smollm, prepared, progress=False, max_batch=1).sweep("z", "layer,pos", **cells)
    assert tiny.stats["forwards"] == tiny.stats["rows"] == 4
    assert (tiny.values - fast.values).abs().max() <= tol


def test_ioi_signal_moves_from_s2_to_final_position(smollm, ioi):
    # Measured (n=4, ABC corruption): in layers ~12-21 the largest positive denoising effect is at S2
    # (0.12-0.40, every other position <= 0.02); from layer ~24 the final position recovers >= 0.9 of the
    # clean logit difference. Layers 18 and 27 sit well inside those ranges, so the margins are large.
    result = ActivationPatcher(smollm, ioi, progress=False).sweep("resid_pre", "layer,pos", layers=[18, 27])
    grid = result.grid("layer", "pos")
    assert result.pos_labels[S2_POS].strip() == ioi.task.examples[0].meta["s"]
    assert int(grid[18].argmax()) == S2_POS and grid[18, S2_POS] > 0.1
    assert int(grid[27].argmax()) == FINAL_POS and grid[27, FINAL_POS] > 0.8


def test_run_patch_on_ioi_keeps_one_template_for_positions(smollm):
    # `--task ioi --by layer,pos` without templates: positions must align, so the runner keeps template 0.
    from circuitlab.runner import run

    done = run("patch", model=smollm, task="ioi", n=3, site="resid_pre", by="layer,pos", layers=[27])
    assert done.task is not None and done.task.params.get("templates") == [0]
    assert len(done.result.records) == len(done.output.sweep.pos_labels)
    best = max(done.result.records, key=lambda r: r["value"])
    assert best["pos"] == FINAL_POS and best["value"] > 0.8  # layer 27: the final position carries the signal
