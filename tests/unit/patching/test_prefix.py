"""Prefix reuse on toy models: the suffix forward equals the plain bridge, every prefix-reuse sweep equals the
plain restart and the full forward, `max_batch` is honoured, and a non-causal model takes the full restart."""

from __future__ import annotations

import pytest
import torch

import circuitlab.patching.prefix as prefix_module
from circuitlab.models.hooks import hook_name
from circuitlab.models.native import load_native
from circuitlab.models.toy import toy_config, toy_model, word_tokenizer
from circuitlab.patching import ActivationPatcher
from circuitlab.patching.prefix import PrefixSupport, SuffixForward, SuffixGroup, prefix_reuse
from circuitlab.patching.restart import LayerRestart
from circuitlab.tasks import Example, Task

EPS = torch.finfo(torch.float32).eps
WORDS = "When Mary and John went to the store , gave a drink Tom Anna Paul Kate".split()
PAIRS = [
    ("When Mary and John went , John gave to", "When Tom and Anna went , Paul gave to", "Mary", "John"),
    ("When Kate and Paul went , Paul gave to", "When Tom and Anna went , John gave to", "Kate", "Paul"),
    ("When Anna and Tom went , Tom gave to", "When Mary and Kate went , John gave to", "Anna", "Tom"),
]


def tolerance(scale: float) -> float:
    """Two float32 computations of one forward that differ only in how sums are grouped (packed suffix vs full
    sequence, other batch shapes) disagree by a few eps of the logits per layer; 64 eps of the logit scale
    covers the layers of these models and is far below any patch effect the tests require (> 1000x it)."""
    return 64 * EPS * max(1.0, scale)


def _task(pairs=PAIRS) -> Task:
    return Task("toy_ioi", [Example(c, x, [" " + a], [" " + w]) for c, x, a, w in pairs])


@pytest.fixture(scope="module")
def gqa():
    return toy_model(words=WORDS, n_layers=3, n_key_value_heads=2, seed=3)


@pytest.fixture(scope="module")
def prepared(gqa):
    return _task().prepare(gqa)


@pytest.fixture(scope="module")
def scale(gqa, prepared):
    with torch.no_grad():
        return float(gqa.bridge(prepared.single_batch().clean, return_type="logits").abs().max())


@pytest.fixture(scope="module")
def bidirectional():
    """The same toy architecture with bidirectional attention: a later token changes earlier positions."""
    tokenizer = word_tokenizer(WORDS)
    config = {**toy_config(n_layers=2, d_vocab=len(tokenizer), seed=4), "attention_dir": "bidirectional"}
    return load_native(config, tokenizer=tokenizer, name="bidirectional")


# --- the suffix forward is pinned to the plain bridge --------------------------------------------------------

@pytest.mark.parametrize("config", [
    {"n_key_value_heads": 2},  # grouped-query attention, rotary, RMSNorm, MLP
    {"attn_only": True},
    {"positional_embedding_type": "standard", "normalization_type": "LN"},
])
def test_suffix_forward_equals_the_plain_bridge(config):
    model = toy_model(n_layers=3, seed=5, **config)
    tokens = torch.randint(3, model.d_vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    restart = LayerRestart(model)
    with torch.no_grad():
        with restart.capture():
            model.bridge(tokens[:1], return_type="logits")
        full, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    receiving = {hook_name("resid_pre", j): cache[hook_name("resid_pre", j)] for j in range(model.n_layers)}
    suffix = SuffixForward(model, restart)
    tol = tolerance(float(full.abs().max()))
    rows = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for layer in range(model.n_layers):
            for start in (0, 1, 4, 8):
                out = suffix.run(layer, [SuffixGroup(start, rows)], receiving, "corrupt")
                assert (out - full[rows, start:]).abs().max() <= tol, (layer, start)
            # several restart points packed into one call: each row's answer position read out
            groups = [SuffixGroup(2, rows[:2]), SuffixGroup(5, rows[2:]), SuffixGroup(7, rows)]
            answer = [torch.tensor([8, 3]), torch.tensor([6]), torch.tensor([7, 8, 7])]
            packed = suffix.run(layer, groups, receiving, "corrupt", answer)[:, 0]
            expected = torch.cat([full[g.rows, a] for g, a in zip(groups, answer, strict=True)])
            assert (packed - expected).abs().max() <= tol, layer
    assert full.abs().max() > 1000 * tol  # the comparison is far from trivially satisfied


def test_prefix_reuse_is_decided_once_per_model(gqa, bidirectional, monkeypatch):
    assert prefix_reuse(gqa).ok
    calls = []
    monkeypatch.setattr(prefix_module, "_check", lambda model: calls.append(model) or PrefixSupport(False, "x"))
    assert prefix_reuse(gqa).ok and calls == []  # cached: the model is not run again
    monkeypatch.undo()
    support = prefix_reuse(bidirectional)
    assert not support.ok and "not causal" in support.reason


# --- sweeps: prefix reuse == plain restart == full forward -----------------------------------------------------

SWEEPS = [(site, by, "denoise") for site, by in [
    ("resid_pre", "layer,pos"), ("attn_out", "layer,pos"), ("mlp_out", "layer,pos"), ("z", "layer,pos"),
    ("resid_mid", "layer,pos"), ("resid_post", "layer,pos"), ("z", "layer,head,pos"), ("q", "layer,head,pos"),
    ("k", "layer,head,pos"), ("v", "layer,head,pos"), ("pattern", "layer,head,pos"), ("pattern", "layer,pos"),
]] + [(site, "layer,pos", "noise") for site in ("resid_pre", "attn_out", "mlp_out", "z")]


@pytest.mark.parametrize("site,by,direction", SWEEPS, ids=[f"{s}-{b}-{d}" for s, b, d in SWEEPS])
def test_prefix_reuse_equals_the_plain_restart(gqa, prepared, scale, site, by, direction):
    fast = ActivationPatcher(gqa, prepared, progress=False).sweep(site, by, direction)
    plain = ActivationPatcher(gqa, prepared, progress=False, prefix=False).sweep(site, by, direction)
    assert fast.stats["prefix_reuse"] == "on" and fast.stats["suffix_rows"] == fast.stats["rows"] > 0
    assert plain.stats["suffix_rows"] == 0
    tol = tolerance(scale)
    assert (fast.values - plain.values).abs().max() <= tol
    baseline = plain.corrupt if direction == "denoise" else plain.clean
    assert (plain.values - baseline).abs().max() > 1000 * tol  # the patches move the metric: the test can fail


def test_prefix_reuse_equals_the_full_forward_and_honours_max_batch(gqa, prepared, scale):
    full = ActivationPatcher(gqa, prepared, progress=False, restart=False).sweep("resid_pre", "layer,pos")
    tol = tolerance(scale)
    for max_batch in (1, 3, 256):
        fast = ActivationPatcher(gqa, prepared, progress=False, max_batch=max_batch).sweep("resid_pre", "layer,pos")
        assert (fast.values - full.values).abs().max() <= tol, max_batch
        # every forward holds at most max_batch rows: with 3 prompts per cell, 1 and 3 need one forward per row
        # or per cell, 256 one per layer
        assert fast.stats["forwards"] >= -(-fast.stats["rows"] // max_batch)
    assert (full.values - full.corrupt).abs().max() > 1000 * tol


def test_prompts_scored_before_the_patch_keep_the_baseline(gqa, scale):
    # The last pair is scored at position 8 of 0..9 ("gave" predicts " to"): a patch at position 9 comes after
    # it and cannot change its score, so its rows skip the forward and keep the baseline.
    examples = [Example(c, x, [" " + a], [" " + w]) for c, x, a, w in PAIRS]
    examples[2] = Example(PAIRS[2][0], PAIRS[2][1], [" to"], [" a"], answer_pos=-2)
    prepared = Task("early", examples).prepare(gqa)
    batch = prepared.single_batch()
    assert batch.answer_pos.tolist() == [9, 9, 8]
    fast = ActivationPatcher(gqa, prepared, progress=False).sweep("resid_pre", "layer,pos")
    full = ActivationPatcher(gqa, prepared, progress=False, restart=False).sweep("resid_pre", "layer,pos")
    assert (fast.values - full.values).abs().max() <= tolerance(scale)
    late = [i for i, c in enumerate(fast.cells) if c.pos == 9]
    assert torch.equal(fast.values[late, 2], fast.corrupt[2].expand(len(late)))
    assert (fast.values[late, :2] - fast.corrupt[:2]).abs().max() > 1000 * tolerance(scale)


# --- the full restart where prefix reuse does not apply ---------------------------------------------------------

def test_non_causal_model_takes_the_full_restart(bidirectional):
    prepared = _task().prepare(bidirectional)
    fast = ActivationPatcher(bidirectional, prepared, progress=False).sweep("resid_pre", "layer,pos")
    full = ActivationPatcher(bidirectional, prepared, progress=False, restart=False).sweep("resid_pre", "layer,pos")
    assert fast.stats["prefix_reuse"].startswith("off") and "not causal" in fast.stats["prefix_reuse"]
    assert fast.stats["suffix_rows"] == 0
    with torch.no_grad():
        scale = float(bidirectional.bridge(prepared.single_batch().clean, return_type="logits").abs().max())
    assert (fast.values - full.values).abs().max() <= tolerance(scale)
    # in a bidirectional model a patch at the last position changes the earlier ones: the prefix would be wrong
    last = [i for i, c in enumerate(fast.cells) if c.pos == max(c.pos for c in fast.cells)]
    assert (fast.values[last] - fast.corrupt).abs().max() > 1000 * tolerance(scale)


def test_a_failed_check_takes_the_full_restart(prepared, monkeypatch):
    model = toy_model(words=WORDS, n_layers=2, seed=6)  # a fresh model: nothing cached for it yet
    monkeypatch.setattr(prefix_module, "_check", lambda m: PrefixSupport(False, "checked: not causal"))
    result = ActivationPatcher(model, _task().prepare(model), progress=False).sweep("attn_out", "layer,pos")
    assert result.stats["prefix_reuse"] == "off (checked: not causal)" and result.stats["suffix_rows"] == 0


@pytest.mark.parametrize("by, status", [
    ("layer", "off (every position is patched: no prefix to reuse)"),
    ("layer,head", "off (every position is patched: no prefix to reuse)"),
])
def test_sweeps_without_positions_have_no_prefix(gqa, prepared, by, status):
    result = ActivationPatcher(gqa, prepared, progress=False).sweep("z", by)
    assert result.stats["prefix_reuse"] == status and result.stats["suffix_rows"] == 0
    off = ActivationPatcher(gqa, prepared, progress=False, prefix=False).sweep("z", "layer,pos")
    assert off.stats["prefix_reuse"] == "off (disabled)"
