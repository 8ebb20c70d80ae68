"""Restart-from-receiver path patching equals the full masked-edge run (toy models: MLPs, attention-only,
GQA; receivers in one layer, in several layers, MLPs, logits), and `max_batch` only changes the cost."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph.direct_paths import feeding_senders, masked_sweep
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import resolve_receivers
from circuitlab.graph.restart import restart_layer, restart_sweep
from circuitlab.models.toy import toy_model

EPS = torch.finfo(torch.float32).eps
WORDS = "a b c d e f g h".split()


def check_equal(fast, ref, scale: float) -> None:
    """Same senders, same numbers up to 64 eps x the largest logit (two float32 orders of one sum; see
    test_direct_paths.tol), and the patches move the metric by far more than that."""
    tol = 64 * EPS * scale
    both = torch.cat([ref.values.flatten(), torch.tensor(list(ref.other.values()))])
    got = torch.cat([fast.values.flatten(), torch.tensor([fast.other[k] for k in ref.other])])
    assert set(fast.other) == set(ref.other) and torch.equal(torch.isnan(both), torch.isnan(got))
    assert (both - ref.clean).nan_to_num().abs().max() > 10 * tol
    assert (got - both).nan_to_num().abs().max() < tol
    assert abs(fast.clean - ref.clean) < tol and abs(fast.corrupt - ref.corrupt) < tol
MODELS = {"mlp": dict(n_layers=3, seed=4), "attn_only": dict(n_layers=3, attn_only=True, seed=1),
          "gqa": dict(n_layers=3, n_key_value_heads=2, seed=2)}


@pytest.fixture(scope="module", params=list(MODELS))
def engine(request):
    return MaskedEdgeEngine(toy_model(words=WORDS, **MODELS[request.param]))


def metric(logits):
    return logits[:, -1, 3] - logits.log_softmax(-1)[:, -1, 4]


@pytest.mark.parametrize("pattern", ["a2.h*<q>", "a1.h1", "a1.h0<k>,a2.h2<v>", "a1.h*<v>,logits", "m1", "m0,a2.h1<q>"])
def test_restart_equals_the_masked_run(engine, pattern):
    if engine.graph.shape.attn_only and "m" in pattern:  # no MLP nodes: the receiver must be refused, not run
        with pytest.raises(GraphError, match="m"):
            resolve_receivers(engine.graph, pattern)
        return
    model = engine.model
    gen = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(3, model.d_vocab, (2, 6), generator=gen) for _ in range(2))
    receivers = resolve_receivers(engine.graph, pattern)
    senders = feeding_senders(engine.graph, receivers)
    fast = restart_sweep(engine, receivers, clean, corrupt, metric, torch.arange(6).expand(2, -1), senders, max_batch=5)
    ref = masked_sweep(engine, receivers, clean, corrupt, metric, senders, chunk=4)
    with torch.no_grad():
        scale = float(model.bridge(clean).abs().max())
    check_equal(fast, ref, scale)
    tiny = restart_sweep(engine, receivers, clean, corrupt, metric, torch.arange(6).expand(2, -1), senders, max_batch=1)
    check_equal(tiny, ref, scale)


def test_restart_layer_and_errors(engine):
    graph = engine.graph
    assert restart_layer(engine, resolve_receivers(graph, "a2.h*<q>,a1.h0<k>")) == 1
    assert restart_layer(engine, ["logits"]) == graph.shape.n_layers
    clean = torch.randint(3, engine.model.d_vocab, (2, 6))
    with pytest.raises(GraphError, match="max_batch"):
        restart_sweep(engine, ["logits"], clean, clean, metric, torch.full((2, 1), 5), ["input"], max_batch=0)


def test_restart_on_a_post_norm_model_equals_the_masked_run(tmp_path):
    """Gemma-3 shape (post-attention norm: a head writes its share of the normalised output; Q/K norms;
    a sliding-window layer): the restart takes every sender output from the engine, so it agrees."""
    from circuitlab import load_model
    from circuitlab.models.toy import tiny_hf_dir

    model = load_model(tiny_hf_dir("gemma3", tmp_path / "model", "a b c d e f g h i j k l".split(), seed=1))
    engine = MaskedEdgeEngine(model)
    gen = torch.Generator().manual_seed(5)
    clean, corrupt = (torch.randint(3, model.d_vocab, (2, 7), generator=gen) for _ in range(2))
    with torch.no_grad():
        scale = float(model.bridge(clean).abs().max())
    for pattern in ("a1.h*<q>", "a1.h0<v>,m1", "logits"):
        receivers = resolve_receivers(engine.graph, pattern)
        senders = feeding_senders(engine.graph, receivers)
        fast = restart_sweep(engine, receivers, clean, corrupt, metric, torch.arange(7).expand(2, -1), senders,
                             max_batch=6)
        check_equal(fast, masked_sweep(engine, receivers, clean, corrupt, metric, senders, chunk=6), scale)


def test_a_replay_that_garbles_a_block_input_raises(monkeypatch):
    """The restart replays blocks on recorded inputs; the engine's self-check does not cover that, so the
    sweep replays the clean run first. Position ids doubled (rotary reads them; a uniform shift would not
    show, rotary attention being relative) must raise."""
    from circuitlab.graph import replay

    engine = MaskedEdgeEngine(toy_model(words=WORDS, **MODELS["mlp"]))
    real = replay.replay_kwargs

    def shifted(kwargs, batch, k):
        out = real(kwargs, batch, k)
        return {**out, "position_ids": out["position_ids"] * 2}

    monkeypatch.setattr(replay, "replay_kwargs", shifted)
    clean = torch.randint(3, engine.model.d_vocab, (2, 6))
    receivers = resolve_receivers(engine.graph, "a1.h*<q>")
    with pytest.raises(GraphError, match=r"replaying blocks 1\.\.2 of the clean run"):
        restart_sweep(engine, receivers, clean, clean, metric, torch.full((2, 1), 5), ["input"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_restart_on_hf_models_equals_the_masked_run(architecture_models, kind):
    """HF GPT-2's blocks take their attention mask and KV cache positionally (block(hidden, cache, mask)):
    the replay repeats that mask for the stacked senders and drops the cache, as for keyword inputs."""
    model = architecture_models(f"hf_{kind}", words="a b c d e f g h i j k l".split())
    engine = MaskedEdgeEngine(model)
    gen = torch.Generator().manual_seed(6)
    clean, corrupt = (torch.randint(3, model.d_vocab, (2, 7), generator=gen) for _ in range(2))
    with torch.no_grad():
        scale = float(model.bridge(clean).abs().max())
    receivers = resolve_receivers(engine.graph, "a1.h*<q>,m1")
    senders = feeding_senders(engine.graph, receivers)
    fast = restart_sweep(engine, receivers, clean, corrupt, metric, torch.arange(7).expand(2, -1), senders,
                         max_batch=6)
    check_equal(fast, masked_sweep(engine, receivers, clean, corrupt, metric, senders, chunk=6), scale)
