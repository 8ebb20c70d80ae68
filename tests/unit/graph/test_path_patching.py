"""Path patching: the masked-edge version agrees with the classic two-step algorithm on direct paths."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import (
    path_patch,
    path_patch_classic,
    path_patch_sweep,
    resolve_receivers,
    run_path_patching,
)
from circuitlab.models.toy import toy_model


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
    assert moved > 1e-3  # the patch does something
    assert (masked - classic).abs().max() < 1e-4


def test_receiver_patterns(deep):
    graph = MaskedEdgeEngine(deep).graph
    assert resolve_receivers(graph, "a2.h1") == ["a2.h1<q>", "a2.h1<k>", "a2.h1<v>"]
    assert resolve_receivers(graph, "a1.h*<k>, logits") == [f"a1.h{h}<k>" for h in range(4)] + ["logits"]
    with pytest.raises(GraphError, match="matches nothing"):
        resolve_receivers(graph, "a5.h*<q>")


def test_errors(deep):
    engine = MaskedEdgeEngine(deep)
    clean, corrupt = prompts(deep)
    with pytest.raises(GraphError, match="no edge runs"):
        path_patch(engine, "a2.h0", "a1.h0<q>", clean, corrupt)
    gqa = toy_model(words="a b c".split(), n_layers=2, n_key_value_heads=2)
    with pytest.raises(GraphError, match="GQA"):
        path_patch_classic(gqa, "a0.h0", "a1.h1<k>", clean[:, :3] % 6, corrupt[:, :3] % 6)


def test_sweep_matches_single_runs(deep):
    engine = MaskedEdgeEngine(deep)
    clean, corrupt = prompts(deep, seed=1)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    sweep = path_patch_sweep(engine, "a2.h*<q>", clean, corrupt, metric, chunk=3)
    assert torch.isnan(sweep.values[2]).all() and not torch.isnan(sweep.values[:2]).any()
    single = float(metric(path_patch(engine, "a1.h2", "a2.h*<q>", clean, corrupt)).mean())
    assert float(sweep.values[1, 2]) == pytest.approx(single, abs=1e-4)
    assert len(sweep.records()) == 12


def test_run_path_patching_writes_result(toy, tmp_path):
    from circuitlab.tasks.task import Example, Task

    task = Task("toy", [Example("Mary and John went to the store", "Mary and Tom went to the store", [" Mary"], [" John"]),
                        Example("Anna and Paul went to the store", "Anna and Kate went to the store", [" Anna"], [" Paul"])])
    result = run_path_patching(toy, task, "a1.h*<q>", tmp_path, chunk=2)
    assert len(result.records) == 8 and (tmp_path / "path_patching.png").is_file()
    layer0 = [r for r in result.records if r["layer"] == 0]
    assert all(r["normalised"] == r["normalised"] for r in layer0)  # layer-0 heads feed layer-1 queries
    assert all(r["normalised"] != r["normalised"] for r in result.records if r["layer"] == 1)  # no edge: NaN
