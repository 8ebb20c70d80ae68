"""Path patching: masked-edge vs classic agreement, receiver patterns, sweeps, and the `path-patch` analysis
(every token-length group runs and is combined by size; receiver typos fail before the model loads)."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from circuitlab.errors import GraphError
from circuitlab.graph.analysis import FIGURE, PATH_PATCH, PathPatchParams, path_patch_task
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import check_receiver_patterns
from circuitlab.graph.path_patching import (
    PathPatchSweep,
    feeding_heads,
    path_patch,
    path_patch_classic,
    path_patch_sweep,
    resolve_receivers,
)
from circuitlab.models.toy import toy_model
from circuitlab.runner import run
from circuitlab.tasks.task import Example, Task

EPS = torch.finfo(torch.float32).eps


def tol(reference: torch.Tensor | float, factor: float = 64) -> float:
    """Agreement tolerance for two float32 computations of the same logits or metric in a different order
    (masked run vs bridge, batched vs single). The rounding error of a reordered float32 sum is a few eps
    times the magnitude of its terms; measured here it is <= 8 eps * max|logit| (toy models and 30-layer
    SmolLM2), so 64 eps leaves an 8x margin and stays far below any patch's effect (asserted > 10 tol)."""
    return factor * EPS * float(torch.as_tensor(reference).detach().abs().max())


@pytest.fixture(scope="module")
def deep():
    return toy_model(words="a b c d e f g h".split(), n_layers=3, seed=4)


def prompts(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(3, model.d_vocab, (2, 6), generator=gen), torch.randint(3, model.d_vocab, (2, 6), generator=gen))


@pytest.mark.parametrize("senders, receivers", [
    ("a0.h1", "a2.h*<q>"), ("a0.h*", "a1.h2"), ("a1.h3", "logits"), ("m0", "a2.h0<v>"),
    ("input", "m1"), ("a0.h2,m1", "a2.h1<k>,a2.h3<q>"),
])
def test_masked_and_classic_agree(deep, senders, receivers):
    engine = MaskedEdgeEngine(deep)
    clean, corrupt = prompts(deep)
    masked = path_patch(engine, senders, receivers, clean, corrupt)
    classic = path_patch_classic(deep, senders, receivers, clean, corrupt)
    with torch.no_grad():
        moved = (masked - deep.bridge(clean)).abs().max()
    assert moved > 10 * tol(classic)  # the patch does something the agreement check could see
    assert (masked - classic).abs().max() < tol(classic)


def test_receiver_patterns(deep):
    graph = MaskedEdgeEngine(deep).graph
    assert resolve_receivers(graph, "a2.h1") == ["a2.h1<q>", "a2.h1<k>", "a2.h1<v>"]
    assert resolve_receivers(graph, "a1.h*<k>, logits") == [f"a1.h{h}<k>" for h in range(4)] + ["logits"]
    with pytest.raises(GraphError, match=r"matches nothing.*layers 0\.\.2, heads 0\.\.3"):
        resolve_receivers(graph, "a5.h*<q>")
    with pytest.raises(GraphError, match="not well formed"):
        resolve_receivers(graph, "a2.h1<x>")


@pytest.mark.parametrize("pattern", [
    "logits", "a9.h*<q>", "a9.h1", "m5", "a9.h6<q>, a9.h9<q>,logits", "*", "a*.h3", "a1[0-5].h*<[qk]>",
    "a9.h[!3]<v>", "m*", "a123.h45",
])
def test_receiver_syntax_accepts(pattern):
    assert check_receiver_patterns(pattern)


@pytest.mark.parametrize("pattern, fragment", [
    ("a9.h1<x>", "not well formed"), ("m5<q>", "not well formed"), ("logit", "not well formed"),
    ("a9h1", "not well formed"), ("a9.h1<q", "not well formed"), ("9.h1", "not well formed"),
    ("input", "no incoming edges"), (" , ", "empty"),
])
def test_receiver_syntax_rejects(pattern, fragment):
    with pytest.raises(GraphError, match=fragment):
        check_receiver_patterns(pattern)


def test_errors(deep):
    engine = MaskedEdgeEngine(deep)
    clean, corrupt = prompts(deep)
    with pytest.raises(GraphError, match="no edge runs"):
        path_patch(engine, "a2.h0", "a1.h0<q>", clean, corrupt)
    gqa = toy_model(words="a b c".split(), n_layers=2, n_key_value_heads=2)
    with pytest.raises(GraphError, match="GQA"):
        path_patch_classic(gqa, "a0.h0", "a1.h1<k>", clean[:, :3] % 6, corrupt[:, :3] % 6)


def test_feeding_heads(deep):
    graph = MaskedEdgeEngine(deep).graph
    assert feeding_heads(graph, ["a2.h0<q>"]) == [(layer, h) for layer in range(2) for h in range(4)]
    assert feeding_heads(graph, ["m1"]) == [(layer, h) for layer in range(2) for h in range(4)]  # a1 feeds m1
    assert feeding_heads(graph, ["a0.h1<k>"]) == []


def test_sweep_matches_single_runs(deep):
    engine = MaskedEdgeEngine(deep)
    clean, corrupt = prompts(deep, seed=1)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    done: list[float] = []
    sweep = path_patch_sweep(engine, "a2.h*<q>", clean, corrupt, metric, chunk=3, advance=done.append)
    assert done == [3, 3, 2]  # 8 feeding heads in chunks of 3: the progress bar sees every sender
    assert torch.isnan(sweep.values[2]).all() and not torch.isnan(sweep.values[:2]).any()
    single = path_patch(engine, "a1.h2", "a2.h*<q>", clean, corrupt)
    # The metric is a difference of two logits, so its rounding error is bounded by twice the logits'.
    assert float(sweep.values[1, 2]) == pytest.approx(float(metric(single).mean()), abs=2 * tol(single))
    assert len(sweep.records()) == 12
    with pytest.raises(GraphError, match="chunk"):
        path_patch_sweep(engine, "a2.h*<q>", clean, corrupt, metric, chunk=0)


def test_weighted_mean_of_sweeps():
    a = PathPatchSweep(["logits"], torch.tensor([[1.0, float("nan")]]), clean=2.0, corrupt=0.0)
    b = PathPatchSweep(["logits"], torch.tensor([[4.0, float("nan")]]), clean=5.0, corrupt=3.0)
    both = PathPatchSweep.weighted_mean([a, b], [2, 1])
    assert both.values[0, 0] == pytest.approx(2.0) and torch.isnan(both.values[0, 1])
    assert (both.clean, both.corrupt) == (pytest.approx(3.0), pytest.approx(1.0))
    with pytest.raises(GraphError, match="different receivers"):
        PathPatchSweep.weighted_mean([a, PathPatchSweep(["m0"], a.values, 0.0, 1.0)], [1, 1])


# --- the `path-patch` analysis ------------------------------------------------------------------------
LONG = Example("When Mary and John went to the store , John gave a drink to",
               "When Tom and Anna went to the store , Paul gave a drink to", [" Mary"], [" John"])
LONG_2 = Example("When John and Mary went to the store , Mary gave a drink to",
                 "When Tom and Anna went to the store , Paul gave a drink to", [" John"], [" Mary"])
SHORT = Example("Mary and John went to the store , John gave a drink to",
                "Tom and Anna went to the store , Paul gave a drink to", [" Mary"], [" John"])


def test_every_length_group_runs_and_is_weighted_by_size(toy):
    """Issue 9: no prompt is dropped. A task of two token lengths (2 prompts + 1 prompt) gives the
    size-weighted mean of the two groups run on their own."""
    params = PathPatchParams("a1.h*<q>", chunk=3)
    both = path_patch_task(toy, Task("two-lengths", [LONG, SHORT, LONG_2]), params)
    long = path_patch_task(toy, Task("long", [LONG, LONG_2]), params).sweep
    short = path_patch_task(toy, Task("short", [SHORT]), params).sweep
    assert both.n_prompts == 3 and both.token_lengths == [14, 15]
    want = (2 * long.values[0] + short.values[0]) / 3
    # The same float32 numbers, only averaged in another order: a few eps of the largest metric value.
    assert (both.sweep.values[0] - want).abs().max() < tol(want, factor=8)
    assert both.sweep.clean == pytest.approx((2 * long.clean + short.clean) / 3, abs=tol(long.clean, 8))
    assert torch.isnan(both.sweep.values[1]).all()  # layer-1 heads do not feed layer-1 queries


def test_result_records_summary_and_figure(toy):
    result = path_patch_task(toy, Task("long", [LONG, LONG_2]), PathPatchParams("a1.h*<q>", chunk=2))
    records = result.records()
    assert len(records) == toy.n_layers * toy.n_heads
    assert all(r["normalised"] == r["normalised"] and r["value"] == r["normalised"] for r in records if r["layer"] == 0)
    summary = result.summary()
    assert summary["receivers"] == "a1.h*<q>" and summary["n_receivers"] == toy.n_heads
    assert summary["strongest_sender"].startswith("a0.h") and summary["token_lengths"] == [15]
    figures = result.figures()
    assert list(figures) == [FIGURE] and isinstance(figures[FIGURE], Figure) and figures[FIGURE].dpi == 150


def test_params_validate_without_a_model():
    with pytest.raises(GraphError, match="not well formed"):
        PATH_PATCH.make_params({"receivers": "a9.h1<x>"})
    with pytest.raises(GraphError, match="chunk"):
        PathPatchParams("logits", chunk=0)
    assert PATH_PATCH.make_params({"receivers": "a9.h*<q>"}) == PathPatchParams("a9.h*<q>", 16)


def test_receivers_outside_the_model_name_the_range(toy):
    with pytest.raises(GraphError, match=r"a7\.h0<q>.*layers 0\.\.1, heads 0\.\.3"):
        path_patch_task(toy, Task("long", [LONG]), PathPatchParams("a7.h0<q>"))
    with pytest.raises(GraphError, match="no attention head"):
        path_patch_task(toy, Task("long", [LONG]), PathPatchParams("a0.h*<q>"))


def test_runner_writes_the_run_directory(toy, tmp_path):
    done = run("path-patch", model=toy, task=Task("long", [LONG, SHORT]), receivers="logits", chunk=4,
               out=tmp_path / "pp")
    assert done.result.params == {"receivers": "logits", "chunk": 4, "method": "auto", "max_batch": 256}
    assert done.result.artifacts == [FIGURE, FIGURE.replace(".png", ".heatmap.json")] and (tmp_path / "pp" / FIGURE).is_file()
    # into the logits every sender is swept: the head grid, the input and each MLP
    n_senders = toy.n_layers * toy.n_heads + 1 + toy.n_layers
    assert done.result.summary["n_prompts"] == 2 and len(done.result.records) == n_senders
