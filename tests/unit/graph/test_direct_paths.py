"""The logits fast path (`direct_logit_sweep`) equals the masked-edge run per sender, and the `path-patch`
analysis dispatches to it (method 'auto') or to the masked reference (method 'masked')."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph.analysis import PathPatchParams, path_patch_task
from circuitlab.graph.direct_paths import SenderSweep, direct_logit_sweep, masked_sweep
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.toy import toy_model
from circuitlab.tasks.task import Example, Task

EPS = torch.finfo(torch.float32).eps


def tol(reference: torch.Tensor | float, factor: float = 64) -> float:
    """Two float32 computations of one metric in a different order (bridge forward vs the engine's own
    attention, one row vs a stack): a few eps times the largest logit; 64 eps leaves a wide margin and
    stays far below the effects compared (asserted > 10 tol)."""
    return factor * EPS * float(torch.as_tensor(reference).detach().abs().max())


WORDS = "a b c d e f g h".split()


@pytest.fixture(scope="module", params=["mlp", "attn_only"])
def model(request):
    if request.param == "mlp":
        return toy_model(words=WORDS, n_layers=3, seed=4)
    return toy_model(words=WORDS, n_layers=3, attn_only=True, seed=1)


def prompts(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, model.d_vocab, (3, 6), generator=gen) for _ in range(2))


def metric(logits):
    return logits[:, -1, 3] - logits.log_softmax(-1)[:, -1, 4]  # reads the whole vocabulary


def check_equal(fast: SenderSweep, ref: SenderSweep, scale: float) -> None:
    assert set(fast.other) == set(ref.other)
    both = torch.cat([ref.values.flatten(), torch.tensor(list(ref.other.values()))])
    got = torch.cat([fast.values.flatten(), torch.tensor([fast.other[k] for k in ref.other])])
    assert torch.equal(torch.isnan(both), torch.isnan(got))
    assert (both - ref.clean).nan_to_num().abs().max() > 10 * tol(scale)  # the patches do something
    assert (got - both).nan_to_num().abs().max() < tol(scale)
    assert fast.clean == pytest.approx(ref.clean, abs=tol(scale)) and fast.corrupt == pytest.approx(ref.corrupt, abs=tol(scale))


def test_equals_the_masked_run_per_sender(model):
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model)
    positions = torch.full((3, 1), 5)
    done: list[float] = []
    fast = direct_logit_sweep(model, clean, corrupt, lambda lg: metric(lg), positions, max_batch=7,
                              advance=done.append)
    ref = masked_sweep(engine, ["logits"], clean, corrupt, metric, engine.graph.senders, chunk=5)
    assert sum(done) == engine.graph.n_senders and max(done) == 2  # max_batch 7 rows = 2 senders x 3 prompts
    with torch.no_grad():
        scale = model.bridge(clean).abs().max()
    check_equal(fast, ref, float(scale))
    assert not torch.isnan(fast.values).any() and "input" in fast.other
    # a tiny max_batch gives the same numbers
    tiny = direct_logit_sweep(model, clean, corrupt, lambda lg: metric(lg), positions, max_batch=1)
    assert (tiny.values - fast.values).abs().max() < tol(scale)


def test_columns_read_only_what_the_metric_reads(model):
    clean, corrupt = prompts(model, seed=2)
    positions = torch.full((3, 1), 5)
    full = direct_logit_sweep(model, clean, corrupt, lambda lg: lg[:, 0, 3] - lg[:, 0, 4], positions)
    cols = direct_logit_sweep(model, clean, corrupt, lambda lg: lg[:, 0, 0] - lg[:, 0, 1], positions,
                              columns=torch.tensor([3, 4]))
    assert (full.values - cols.values).abs().max() < tol(full.values, 8)


def test_records_name_every_sender(model):
    clean, corrupt = prompts(model)
    sweep = direct_logit_sweep(model, clean, corrupt, lambda lg: lg[:, 0, 3], torch.full((3, 1), 5))
    names = [r["sender"] for r in sweep.records()]
    assert names[-len(sweep.other):] == list(sweep.other) and len(names) == len(set(names))
    both = SenderSweep.weighted_mean([sweep, sweep], [1, 3])
    assert both.other == pytest.approx(sweep.other) and both.records()[-1]["head"] is None
    with pytest.raises(GraphError, match="unknown senders"):
        direct_logit_sweep(model, clean, corrupt, lambda lg: lg[:, 0, 3], torch.full((3, 1), 5), senders=["a9.h0"])
    with pytest.raises(GraphError, match="max_batch"):
        direct_logit_sweep(model, clean, corrupt, lambda lg: lg[:, 0, 3], torch.full((3, 1), 5), max_batch=0)


LONG = Example("When Mary and John went to the store , John gave a drink to",
               "When Tom and Anna went to the store , Paul gave a drink to", [" Mary"], [" John"])
LONG_2 = Example("When John and Mary went to the store , Mary gave a drink to",
                 "When Tom and Anna went to the store , Paul gave a drink to", [" John"], [" Mary"])


@pytest.mark.parametrize("metric_name", ["logit_diff", "logprob"])
@pytest.mark.parametrize("receivers", ["logits", "a1.h*<q>", "a1.h2,m0"])
def test_analysis_auto_equals_masked(toy, metric_name, receivers):
    task = Task("long", [LONG, LONG_2], metric=metric_name)
    fast = path_patch_task(toy, task, PathPatchParams(receivers, max_batch=3))
    ref = path_patch_task(toy, task, PathPatchParams(receivers, chunk=4, method="masked"))
    assert fast.summary()["method"] != ref.summary()["method"]
    with torch.no_grad():
        scale = float(toy.bridge(toy.to_tokens(LONG.clean)).abs().max())
    check_equal(fast.sweep, ref.sweep, scale)
    assert [r["sender"] for r in fast.records()] == [r["sender"] for r in ref.records()]


def test_method_is_validated_without_a_model():
    with pytest.raises(GraphError, match="method"):
        PathPatchParams("logits", method="fast")
    with pytest.raises(GraphError, match="max_batch"):
        PathPatchParams("logits", max_batch=0)


# --- post-attention norms (Gemma-3 shape) and the self-check ---------------------------------------------
@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny random Gemma-3-shaped HF model (Q/K norms, pre and post norms, a sliding-window layer of 4
    keys, one kv head) booted through the bridge."""
    from circuitlab import load_model
    from circuitlab.models.toy import tiny_hf_dir

    words = "a b c d e f g h i j k l".split()
    return load_model(tiny_hf_dir("gemma3", tmp_path_factory.mktemp("gemma3") / "model", words, seed=1))


def gemma_prompts(model):
    """7 tokens: longer than the sliding window, so both mask kinds matter."""
    gen = torch.Generator().manual_seed(5)
    return tuple(torch.randint(3, model.d_vocab, (2, 7), generator=gen) for _ in range(2))


def test_post_norm_heads_equal_the_masked_run(gemma3):
    """With a post-attention norm a head writes its share of the normalised output, not z W_O: every
    sender (input, each head, each MLP) into the logits equals the masked-edge run. The old z W_O
    decomposition missed by ~4e-2 here, far above tol (~1e-5)."""
    engine = MaskedEdgeEngine(gemma3)
    clean, corrupt = gemma_prompts(gemma3)
    positions = torch.full((2, 1), 6)
    fast = direct_logit_sweep(gemma3, clean, corrupt, lambda lg: metric(lg), positions, max_batch=5)
    ref = masked_sweep(engine, ["logits"], clean, corrupt, metric, engine.graph.senders, chunk=6)
    with torch.no_grad():
        scale = float(gemma3.bridge(clean).abs().max())
    check_equal(fast, ref, scale)
    assert not torch.isnan(fast.values).any() and set(fast.other) == {"input", "m0", "m1"}
    heads = (fast.values - ref.clean).abs()
    assert heads.max() > 10 * tol(scale)  # the heads themselves move the metric


def test_a_wrong_head_decomposition_raises(gemma3, monkeypatch):
    """The fast path checks itself before reporting: heads as plain z W_O (ignoring the post-norm) no
    longer rebuild the final residual stream, so the sweep raises instead of returning numbers."""
    from circuitlab.graph import direct_paths

    def plain_z_w_o(model, layer):
        W_O = model.bridge.blocks[layer].attn.W_O.detach()
        return (lambda z: torch.einsum("bphe,hed->hbpd", z, W_O)), None

    monkeypatch.setattr(direct_paths, "head_outputs_fn", plain_z_w_o)
    clean, corrupt = gemma_prompts(gemma3)
    with pytest.raises(GraphError, match=r"clean run's final residual stream .* prompt \d, scored position 0"):
        direct_logit_sweep(gemma3, clean, corrupt, lambda lg: metric(lg), torch.full((2, 1), 6))


def test_reconstruction_tolerance_is_tight(model, monkeypatch):
    """The identity fails on a small error too: one head's output off by 1e-4 relative to the terms'
    magnitude (about 800 eps, above the 64-eps tolerance) is caught, in the run it affects."""
    from circuitlab.graph import direct_paths

    real = direct_paths.record_direct
    calls: list[int] = []

    def nudged(*args, **kwargs):
        record = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the corrupt run
            record.outputs[1] += 1e-4 * float(record.outputs.abs().sum(0).max())
        return record

    monkeypatch.setattr(direct_paths, "record_direct", nudged)
    clean, corrupt = prompts(model)
    with pytest.raises(GraphError, match="corrupt run's final residual"):
        direct_logit_sweep(model, clean, corrupt, lambda lg: metric(lg), torch.full((3, 1), 5))
