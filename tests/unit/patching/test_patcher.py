"""ActivationPatcher on toy models: parity with transformer_lens.patching, identities, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl

from circuitlab.errors import CircuitlabError, PatchingError, TokenizationError
from circuitlab.models.toy import toy_model
from circuitlab.patching import ActivationPatcher, PatchingResult
from circuitlab.runner import run
from circuitlab.tasks import Example, Task

EPS = torch.finfo(torch.float32).eps
WORDS = "When Mary and John went to the store , gave a drink Tom Anna Paul Kate".split()
PAIRS = [  # short prompts keep the TransformerLens sweeps (one forward per cell) quick
    ("When Mary and John went , John gave to", "When Tom and Anna went , Paul gave to", "Mary", "John"),
    ("When Kate and Paul went , Paul gave to", "When Tom and Anna went , John gave to", "Kate", "Paul"),
    ("When Anna and Tom went , Tom gave to", "When Mary and Kate went , John gave to", "Anna", "Tom"),
]

@pytest.fixture(scope="module")
def gqa():
    """4 query heads sharing 2 kv heads, with MLPs: covers every site including GQA k/v."""
    model = toy_model(words=WORDS, n_layers=2, n_key_value_heads=2, seed=3)
    model.bridge.eval()  # transformer_lens.patching refuses models in training mode
    return model


def _task(metric: str = "logit_diff") -> Task:
    return Task("toy_ioi", [Example(c, x, [" " + a], [" " + w]) for c, x, a, w in PAIRS], metric=metric)


@pytest.fixture(scope="module")
def prepared(gqa):
    return _task().prepare(gqa)


@pytest.fixture(scope="module")
def tol(gqa, prepared):
    """Two float32 computations of one patched forward that group their sums differently (restart vs full
    forward, other batch shapes, TransformerLens' hooks) differ by a few eps of the logits per layer: 64 eps
    of the largest clean logit covers both layers and is far below the patch effects the tests require."""
    with torch.no_grad():
        logits = gqa.bridge(prepared.single_batch().clean, return_type="logits")
    return 64 * EPS * max(1.0, float(logits.abs().max()))


def _tl_sweep(model, prepared, fn, direction="denoise", index: pd.DataFrame | None = None):
    batch = prepared.single_batch()
    receiving, donor = (batch.corrupt, batch.clean) if direction == "denoise" else (batch.clean, batch.corrupt)
    extra = {} if index is None else {"index_axis_names": None, "index_df": index}
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(donor)
        return fn(model.bridge, receiving, cache, lambda logits: prepared.metric(logits, batch).mean(), **extra)


# TL function, our site, our granularity, TL axis names (order of TL's output dims)
TL_SWEEPS = [
    (tl.get_act_patch_resid_pre, "resid_pre", "layer,pos", ("layer", "pos")),
    (tl.get_act_patch_resid_mid, "resid_mid", "layer,pos", ("layer", "pos")),
    (tl.get_act_patch_attn_out, "attn_out", "layer,pos", ("layer", "pos")),
    (tl.get_act_patch_mlp_out, "mlp_out", "layer,pos", ("layer", "pos")),
    (tl.get_act_patch_attn_head_out_by_pos, "z", "layer,head,pos", ("layer", "pos", "head")),
    (tl.get_act_patch_attn_head_q_by_pos, "q", "layer,head,pos", ("layer", "pos", "head")),
    (tl.get_act_patch_attn_head_k_by_pos, "k", "layer,head,pos", ("layer", "pos", "head")),
    (tl.get_act_patch_attn_head_v_by_pos, "v", "layer,head,pos", ("layer", "pos", "head")),
    (tl.get_act_patch_attn_head_pattern_by_pos, "pattern", "layer,head,pos", ("layer", "head", "pos")),
    (tl.get_act_patch_attn_head_out_all_pos, "z", "layer,head", ("layer", "head")),
    (tl.get_act_patch_attn_head_q_all_pos, "q", "layer,head", ("layer", "head")),
    (tl.get_act_patch_attn_head_k_all_pos, "k", "layer,head", ("layer", "head")),
    (tl.get_act_patch_attn_head_v_all_pos, "v", "layer,head", ("layer", "head")),
    (tl.get_act_patch_attn_head_pattern_all_pos, "pattern", "layer,head", ("layer", "head")),
]


def _as_dict(result: PatchingResult, axes: tuple[str, ...]) -> dict[tuple, float]:
    means = result.mean().tolist()
    return {tuple(getattr(c, a) for a in axes): v for c, v in zip(result.cells, means, strict=True)}


@pytest.mark.parametrize("fn,site,by,axes", TL_SWEEPS, ids=[f"{s}-{b}" for _, s, b, _ in TL_SWEEPS])
def test_matches_transformer_lens(gqa, prepared, tol, fn, site, by, axes):
    # (layer, head, pos) sweeps: a few positions (TransformerLens runs one forward per cell; keeps this quick)
    positions = [2, 5, 8] if by == "layer,head,pos" else None
    ours = ActivationPatcher(gqa, prepared, progress=False, max_batch=5).sweep(site, by, positions=positions)
    mine = _as_dict(ours, axes)
    index = pd.DataFrame(list(mine), columns=list(axes)) if positions else None
    theirs = _tl_sweep(gqa, prepared, fn, index=index)
    assert len(mine) == theirs.numel()
    for row, (key, value) in enumerate(mine.items()):
        expected = float(theirs[row]) if positions else float(theirs[key])
        assert value == pytest.approx(expected, abs=tol), key
    assert (ours.mean() - ours.corrupt.mean()).abs().max() > 100 * tol  # the sweep is not trivially the baseline


def test_noising_matches_transformer_lens(gqa, prepared, tol):
    theirs = _tl_sweep(gqa, prepared, tl.get_act_patch_resid_pre, direction="noise")
    ours = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer,pos", "noise")
    assert (ours.mean().reshape(theirs.shape) - theirs).abs().max() <= tol
    assert (theirs - ours.clean.mean()).abs().max() > 100 * tol  # noising moves the metric off the clean one
    assert ours.direction == "noise"


def test_identity_all_positions_layer0_gives_clean(gqa, prepared, tol):
    result = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer", layers=[0])
    assert (result.values[0] - result.clean).abs().max() <= tol
    gap = float((result.clean.mean() - result.corrupt.mean()).abs())
    assert gap > 100 * tol  # clean and corrupt differ, so "equals clean" is a real claim
    assert float(result.normalised()[0]) == pytest.approx(1.0, abs=tol / gap)  # the metric's error over the gap


def test_all_heads_z_equals_attn_out(gqa, prepared, tol):
    patcher = ActivationPatcher(gqa, prepared, progress=False)
    z = patcher.sweep("z", "layer")
    attn = patcher.sweep("attn_out", "layer")
    assert (z.values - attn.values).abs().max() <= tol
    assert (z.values - z.corrupt).abs().max() > 100 * tol


@pytest.mark.parametrize("site,by", [("resid_post", "layer,pos"), ("mlp_out", "layer"), ("k", "layer,head,pos"),
                                     ("pattern", "layer,pos"), ("q", "layer,head")])
def test_restart_equals_full_forward_sweep(gqa, prepared, tol, site, by):
    fast = ActivationPatcher(gqa, prepared, progress=False, max_batch=4).sweep(site, by, "noise")
    full = ActivationPatcher(gqa, prepared, progress=False, restart=False).sweep(site, by, "noise")
    assert (fast.values - full.values).abs().max() <= tol
    assert (full.values - full.clean).abs().max() > 100 * tol


def test_per_layer_sweep_over_several_prompt_lengths(gqa, tol):
    pairs = [*PAIRS, ("When Mary and John went , John gave", "When Tom and Anna went , Paul gave", "to", "a")]
    prepared = Task("mixed", [Example(c, x, [" " + a], [" " + w]) for c, x, a, w in pairs]).prepare(gqa)
    assert len(prepared.batches) == 2
    fast = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer")
    full = ActivationPatcher(gqa, prepared, progress=False, restart=False).sweep("resid_pre", "layer")
    assert (fast.values - full.values).abs().max() <= tol
    assert (fast.values[0] - fast.clean).abs().max() <= tol
    assert (fast.values[1] - fast.corrupt).abs().max() > 100 * tol
    with pytest.raises(TokenizationError, match="one token length"):
        ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer,pos")


def test_identical_positions_are_skipped_and_equal_baseline(gqa, prepared):
    result = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer,pos")
    assert result.stats["cells_skipped"] >= 2 * gqa.n_layers  # BOS and 'When' are shared by every pair
    bos = [i for i, c in enumerate(result.cells) if c.pos == 0]
    assert torch.equal(result.values[bos], result.corrupt.expand(len(bos), -1))


def test_kl_metric_and_answer_position_path(gqa, tol):
    prepared = _task("kl").prepare(gqa)
    fast = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer,pos", layers=[1])
    full = ActivationPatcher(gqa, prepared, progress=False, restart=False).sweep("resid_pre", "layer,pos", layers=[1])
    assert (fast.values - full.values).abs().max() <= tol
    assert fast.clean.abs().max() <= tol  # KL of the clean run to itself
    assert fast.values.abs().max() > 100 * tol


def test_bad_input_raises_clear_errors(gqa, prepared, toy_attn_only):
    patcher = ActivationPatcher(gqa, prepared, progress=False)
    with pytest.raises(PatchingError, match="unknown patching site"):
        patcher.sweep("resid_middle")
    with pytest.raises(PatchingError, match="head index 2 out of range 0..1.*kv head"):
        patcher.sweep("k", "layer,head", heads=[2])
    with pytest.raises(PatchingError, match="head index 4 out of range"):
        patcher.sweep("z", "layer,head", heads=[4])
    with pytest.raises(PatchingError, match="layer index 5"):
        patcher.sweep("z", "layer,head", layers=[5])
    with pytest.raises(PatchingError, match="has no heads"):
        patcher.sweep("resid_pre", "layer,head")
    with pytest.raises(PatchingError, match="unsupported granularity"):
        patcher.sweep("resid_pre", "pos")
    with pytest.raises(PatchingError, match="unknown direction"):
        patcher.sweep("resid_pre", direction="sideways")
    with pytest.raises(PatchingError, match="max_batch"):
        ActivationPatcher(gqa, prepared, max_batch=0)
    with pytest.raises(PatchingError, match="attention-only"):
        ActivationPatcher(toy_attn_only, _task().prepare(toy_attn_only), progress=False).sweep("mlp_out")
    unaligned = Task("u", [Example("When Mary and John went", "When Tom went", [" Mary"], [" John"])],
                     align=False).prepare(gqa)
    with pytest.raises(TokenizationError, match="same token length"):
        ActivationPatcher(gqa, unaligned)
    assert issubclass(PatchingError, CircuitlabError)


def test_result_records_json_and_run_patch(gqa, tmp_path):
    out = tmp_path / "run"
    done = run("patch", model=gqa, task=_task(), site="z", by="layer,head,pos", out=out)
    sweep = done.output.sweep
    result = done.result
    assert {"site", "layer", "pos", "head", "value"} <= result.records[0].keys()
    n_pos = len(sweep.pos_labels)
    assert len(result.records) == len(sweep.cells) == gqa.n_layers * gqa.n_heads * n_pos
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"] == "patch" and len(saved["records"]) == len(sweep.cells)
    assert saved["params"] == {"site": "z", "by": "layer,head,pos", "direction": "denoise", "max_batch": 256,
                               "per_prompt": False, "layers": None}
    assert saved["summary"]["n_cells"] == len(sweep.cells) and saved["summary"]["site"] == "z"
    assert (out / "heatmap_z_layer_pos.png").stat().st_size > 1000
    assert (out / "heatmap_z_layer_head.png").stat().st_size > 1000
    assert sorted(saved["artifacts"]) == ["heatmap_z_layer_head.heatmap.json", "heatmap_z_layer_head.png",
                                      "heatmap_z_layer_pos.heatmap.json", "heatmap_z_layer_pos.png", "patching.json"]
    back = PatchingResult.from_json((out / "patching.json").read_text())
    assert back.cells == sweep.cells and torch.equal(back.values, sweep.values)  # JSON keeps every float32 bit
    frame = pd.read_csv(out / "results.csv")
    assert frame["value"].notna().all()


def test_run_patch_per_prompt_and_layers(gqa):
    done = run("patch", model=gqa, task=_task(), site="resid_pre", by="layer", direction="noising",
               per_prompt=True, layers=[1])
    records = done.result.records
    assert len(records) == 1 * 3 and [r["prompt"] for r in records] == [0, 1, 2]
    assert {r["layer"] for r in records} == {1} and done.result.params["direction"] == "noise"
    sweep = done.output.sweep
    # per-prompt values normalise each prompt by its own clean / corrupt metric
    expected = (sweep.values[0] - sweep.corrupt) / (sweep.clean - sweep.corrupt)
    assert [r["value"] for r in records] == expected.tolist()  # the same float32 formula, read back as floats
    assert done.result.summary == sweep.summary()


def _recording_bar(calls):
    from contextlib import contextmanager

    @contextmanager
    def bar(total, description):
        done = []
        calls.append((total, description, done))
        yield done.append

    return bar


def test_progress_bar_counts_every_row_once(gqa, prepared, monkeypatch):
    # The bar (with ETA, circuitlab.progress) must end at its total, skipped cells included, or the ETA lies.
    import circuitlab.patching.patcher as patcher_module

    calls = []
    monkeypatch.setattr(patcher_module, "progress_bar", _recording_bar(calls))
    result = ActivationPatcher(gqa, prepared, max_batch=4).sweep("resid_pre", "layer,pos")
    [(total, description, done)] = calls
    assert total == len(result.cells) * prepared.n_prompts == sum(done)
    assert result.stats["cells_skipped"] > 0 and "resid_pre" in description
    calls.clear()
    ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer")
    assert calls == []
