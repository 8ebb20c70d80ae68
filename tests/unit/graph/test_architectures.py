"""The edge graph on every supported architecture, built in code (issue 10): native toy models (causal and
bidirectional, LayerNorm with learned positions, no norm, attention-only, ReLU / gated MLPs with GQA,
soft-capped scores) and tiny random HF models (Llama-, GPT-2- and Gemma-3-shaped) booted through the
bridge. For each: the self-check identities, masked vs classic path patching on direct paths, and a
single-edge ablation against a hand-written hook implementation of the same ablation. Plus the
self-check itself: a drifted config raises instead of returning numbers, verdicts are cached."""

from __future__ import annotations

import pytest
import torch
from conftest import masked_identity_logits

from circuitlab.errors import GraphError
from circuitlab.graph import masked as masked_module
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.analysis import PathPatchParams, path_patch_task
from circuitlab.graph.attention import HeadwiseAttention
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_patch, path_patch_classic
from circuitlab.models.hooks import hook_name
from circuitlab.models.toy import ARCHITECTURES, HF_KINDS, toy_model
from circuitlab.tasks.task import Example, Task

WORDS = "a b c d e f g h i j k l".split()
EPS = torch.finfo(torch.float32).eps
NAMES = [*ARCHITECTURES, *(f"hf_{kind}" for kind in HF_KINDS)]


def tol(reference: torch.Tensor, factor: float = 64) -> float:
    """Two float32 computations of the same logits in a different order (masked run vs bridge, masked vs
    classic, engine vs hand-written hooks): measured <= 8 eps * max|logit| on these models, so 64 eps
    (~1e-5 relative) leaves an 8x margin while every ablation below moves the logits by > 10 tol."""
    return factor * EPS * float(reference.detach().abs().max())


@pytest.fixture(scope="module")
def models(architecture_models):
    return lambda name: architecture_models(name, words=WORDS, n_layers=2)


def prompts(model, n_pos=7):
    """Clean and corrupt ids of n_pos tokens (longer than the Gemma-shaped sliding window of 4)."""
    gen = torch.Generator().manual_seed(5)
    return (torch.randint(3, model.d_vocab, (2, n_pos), generator=gen),
            torch.randint(3, model.d_vocab, (2, n_pos), generator=gen))


def has_post_norm(model) -> bool:
    return hasattr(model.bridge.blocks[0], "ln1_post")


@pytest.mark.parametrize("name", NAMES)
def test_self_check_identities(models, name):
    model = models(name)
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model)
    kept, ablated, want_clean, want_corrupt = masked_identity_logits(engine, clean, corrupt)
    assert (kept - want_clean).abs().max() < tol(want_clean)
    assert (ablated - want_corrupt).abs().max() < tol(want_corrupt)
    assert (want_clean - want_corrupt).abs().max() > 10 * tol(want_clean)
    expected = "bidirectional" if "bidirectional" in name else "causal"
    masks = ("sliding window 4", "causal") if name == "hf_gemma3" else (expected, expected)
    assert engine.masks == masks


def direct_paths(model) -> list[tuple[str, str]]:
    """Sender -> receiver sets with every receiver in one place (where masked and classic agree). Under GQA
    the classic algorithm cannot ungroup k/v receivers, so those use q and logits. With a post-attention
    norm a head's output is its share of the normalised output (graph/attention.py), while the classic
    algorithm patches z and lets the norm rescale: head senders are compared where there is no post-norm."""
    gqa = model.n_kv_heads != model.n_heads
    paths = [("input", "a1.h*<q>" if gqa else "a1.h*"), ("input", "logits")]
    if not model.attn_only:
        paths += [("m0", "a1.h2<q>"), ("m0,input", "logits")]
    if not has_post_norm(model):
        paths += [("a0.h1", "a1.h*<q>"), ("a0.h0,a1.h3", "logits")]
        if not gqa:
            paths.append(("a0.h*", "a1.h2<v>"))
    return paths


@pytest.mark.parametrize("name", NAMES)
def test_masked_and_classic_path_patching_agree(models, name):
    model = models(name)
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model)
    with torch.no_grad():
        plain = model.bridge(clean)
    for senders, receivers in direct_paths(model):
        masked = path_patch(engine, senders, receivers, clean, corrupt)
        classic = path_patch_classic(model, senders, receivers, clean, corrupt, graph=engine.graph)
        assert (masked - plain).abs().max() > 10 * tol(classic), (senders, receivers)
        assert (masked - classic).abs().max() < tol(classic), (senders, receivers)


def _inner(module):
    return getattr(module, "original_component", module)


@pytest.mark.parametrize("name", NAMES)
def test_single_edge_ablation_equals_hand_written_hooks(models, name):
    """Ablating input -> a1.h1<q> (corrupt): head 1 of layer 1 computes its query from the residual with
    the embedding swapped for the corrupt one, everything else unchanged. Written here with the bridge's
    hook_q and the layer's own norm and W_Q; and an edge into the logits, by hook_mlp_out / hook_z."""
    model = models(name)
    engine = MaskedEdgeEngine(model)
    graph, bridge = engine.graph, model.bridge
    clean, corrupt = prompts(model)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    _, clean_cache = bridge.run_with_cache(clean)
    _, corrupt_cache = bridge.run_with_cache(corrupt)
    embed = hook_name("resid_pre", 0)
    delta = clean_cache[embed] - corrupt_cache[embed]
    block = bridge.blocks[1]
    norm = _inner(block.ln1)

    def patch_q(q, hook):
        new = torch.einsum("bpd,de->bpe", norm(clean_cache[hook_name("resid_pre", 1)] - delta), block.attn.W_Q[1])
        if block.attn.b_Q is not None:
            new = new + block.attn.b_Q[1]
        q = q.clone()
        q[:, :, 1] = new
        return q

    if model.attn_only:
        sender = "a0.h0"
        out = lambda cache: torch.einsum("bpe,ed->bpd", cache[hook_name("z", 0)][:, :, 0], bridge.blocks[0].attn.W_O[0])  # noqa: E731
    else:
        sender = "m0"
        out = lambda cache: cache[hook_name("mlp_out", 0)]  # noqa: E731
    logits_delta = out(clean_cache) - out(corrupt_cache)
    final = engine.final_hook
    cases = [("input->a1.h1<q>", [(hook_name("q", 1), patch_q)]),
             (f"{sender}->logits", [(final, lambda x, hook: x - logits_delta)])]
    with torch.no_grad():
        plain = bridge(clean)
        for edge, hooks in cases:
            coeff = torch.ones(graph.n_edges)
            coeff[graph.edge_id(edge)] = 0.0
            got = engine.run(clean, coeff, ablated)
            want = bridge.run_with_hooks(clean, fwd_hooks=hooks)
            assert (want - plain).abs().max() > 10 * tol(want), edge
            assert (got - want).abs().max() < tol(want), edge


def test_post_norm_head_shares_sum_to_the_block_output(models):
    """Gemma-3 shape: each head's share of the normalised attention output; the shares add up to the
    block's output (hook_attn_out, after the post-attention norm) exactly."""
    model = models("hf_gemma3")
    engine = MaskedEdgeEngine(model)
    clean, _ = prompts(model)
    _, cache = model.bridge.run_with_cache(clean)
    for layer, attention in enumerate(engine.layers):
        assert attention.post_norm is not None and attention.q_norm is not None
        shares = attention.head_outputs(cache[hook_name("z", layer)])
        want = cache[hook_name("attn_out", layer)]
        assert (shares.sum(0) - want).abs().max() < tol(want, factor=16)


# --- the self-check ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("built, drifted", [("causal", "bidirectional"), ("bidirectional", "causal")])
def test_drifted_config_raises_instead_of_returning_numbers(built, drifted):
    """Issue 10: the loaded module keeps the mask it was built with; a config edited afterwards used to give
    logits off by ~1 with no warning. Now every route onto the graph raises, naming what differs."""
    model = toy_model(words=WORDS, n_layers=2, seed=7, attention_dir=built)
    graph = Graph.from_model(model)
    clean, corrupt = prompts(model)
    model.bridge.cfg.attention_dir = drifted
    with pytest.raises(GraphError, match=rf"attention_dir='{drifted}'.*layer 0's forward applies {built}"):
        MaskedEdgeEngine(model)
    circuit = Circuit.full(graph, model=model)
    with pytest.raises(GraphError, match="self-check"):
        circuit.run(clean, corrupt=corrupt)
    with pytest.raises(GraphError, match="self-check"):
        path_patch_task(model, Task("one", [Example("a b c d", "e f g h", [" a"], [" b"])]), PathPatchParams("a1.h*<q>"))
    model.bridge.cfg.attention_dir = built  # the verdict follows the config: fixed, the engine builds
    assert MaskedEdgeEngine(model).masks == (built, built)


def test_self_check_runs_once_per_model(monkeypatch):
    model = toy_model(words=WORDS, n_layers=2, seed=8)
    calls = []
    real = masked_module._run_self_check
    monkeypatch.setattr(masked_module, "_run_self_check", lambda engine: calls.append(1) or real(engine))
    first = MaskedEdgeEngine(model)
    second = MaskedEdgeEngine(model)
    assert len(calls) == 1 and [a.scale for a in second.layers] == [a.scale for a in first.layers]
    with torch.no_grad():  # an in-place weight change bumps the version counter: checked again
        model.bridge.blocks[0].attn.W_Q  # noqa: B018 - the property reads the weights, changes nothing
        next(model.bridge.parameters()).mul_(1.0)
    MaskedEdgeEngine(model)
    assert len(calls) == 2


def test_a_wrong_engine_fails_its_self_check(monkeypatch):
    """Any disagreement with the forward is a GraphError saying what differs, never numbers: here the
    recomputed attention uses a scale the forward does not (as a wrong config-derived scale would)."""
    model = toy_model(words=WORDS, n_layers=2, seed=9)
    monkeypatch.setattr(masked_module.HeadwiseAttention, "probe", lambda self, *a: "causal")
    real_init = HeadwiseAttention.__init__

    def wrong_scale(self, bridge, layer):
        real_init(self, bridge, layer)
        self.scale = 0.5 * self.scale

    monkeypatch.setattr(masked_module.HeadwiseAttention, "__init__", wrong_scale)
    with pytest.raises(GraphError, match=r"self-check.*layer 0: the recomputed attention output z differs"):
        MaskedEdgeEngine(model)


def test_probe_names_the_scale_the_forward_uses():
    """An attention that is not softmax(scale * q.k) for any scale the module names: the error gives the
    layer and the scale the forward's pattern fits."""
    model = toy_model(words=WORDS, n_layers=2, seed=10)
    attention = HeadwiseAttention(model.bridge, 0)
    attention.scale_candidates = [("bogus", 1.0)]
    clean, _ = prompts(model)
    _, cache = model.bridge.run_with_cache(clean)
    with pytest.raises(GraphError, match=r"layer 0: .*bogus 1.*fits a scale of 0\.35355"):
        attention.probe(cache[hook_name("resid_pre", 0)], cache[hook_name("pattern", 0)], None, None)
