"""Edge scores on toy models: EAP against finite differences, EAP-IG(m=1) against EAP, exact effects
against single-edge masked runs, metrics, ablations and node scores."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_WORDS

from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import BatchInputs, EdgeScoring, edge_scores, exact_sums, node_scores
from circuitlab.errors import DiscoveryError
from circuitlab.graph.masked import MaskedEdgeEngine
from unit.discovery.test_scores_gradients import bound, coefficient_scores

EPS = torch.finfo(torch.float32).eps


def some_edges(graph):
    """One edge of every kind: into a q, a k, a v input, an MLP and the logits, from several senders."""
    picks = ["input->a0.h1<q>", "input->a1.h0<k>", "a0.h2->a1.h3<v>", "a0.h0->m0", "m0->m1", "a1.h1->logits",
             "m1->logits", "input->logits"]
    return [graph.edge_id(e) for e in picks if e in graph.edge_index]


def masked_metric(model, task, rows, ablation="corrupt", one_by_one=True, metric=None, positions="last"):
    """Mean metric over the prompts for each coefficient row: plain engine runs (full forwards, every
    position unembedded), one row per forward (the oracle for exact effects) or all rows in one forward."""
    prepared = task.prepare(model)
    engine = MaskedEdgeEngine(model)
    scorer = discovery_metric(prepared, metric, positions)
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for batch in prepared.batches:
            inputs = BatchInputs.build(engine, batch, ablation, scorer)
            if one_by_one:
                for i, row in enumerate(rows):
                    logits = engine.run(batch.clean, row, inputs.ablated)
                    total[i] += scorer(logits, batch, inputs.reference).double().sum()
            else:
                logits = engine.run(batch.clean, rows, inputs.ablated)
                repeated, reference = inputs.repeated(rows.shape[0])
                values = scorer(logits.reshape(-1, *logits.shape[2:]), repeated, reference).view(rows.shape[0], -1)
                total += values.double().sum(1)
    return total / prepared.n_prompts


def test_eap_equals_finite_differences_of_the_coefficient(toy, names_task):
    """EAP = -dm/dc at c = 1. One-sided second-order differences (c in [0, 1]) at step h and 2h:
    d ~ (3 m(1) - 4 m(1-h) + m(1-2h)) / 2h. Their truncation error is O(h^2), so |d_h - d_2h| bounds
    the error of d_h (x 4/3, taken as x 2), plus float32 rounding of the means: ~8 eps |m| / h
    (64 eps for a 8x margin). A wrong sign or a missing edge term fails by far more."""
    scores = edge_scores(toy, names_task, method="eap").scores
    graph = MaskedEdgeEngine(toy).graph
    edges = some_edges(graph)
    h = 0.05
    rows = []
    for e in edges:
        for c in (1.0, 1 - h, 1 - 2 * h, 1 - 4 * h):
            row = torch.ones(graph.n_edges)
            row[e] = c
            rows.append(row)
    m = masked_metric(toy, names_task, torch.stack(rows), one_by_one=False).view(len(edges), 4)

    d_h = (3 * m[:, 0] - 4 * m[:, 1] + m[:, 2]) / (2 * h)
    d_2h = (3 * m[:, 0] - 4 * m[:, 2] + m[:, 3]) / (4 * h)
    rounding = 64 * EPS * float(m.abs().max()) / h
    bound = 2 * (d_h - d_2h).abs() + rounding
    eap = -scores[edges].double()
    assert ((eap - d_h).abs() <= bound).all(), (eap, d_h, bound)
    assert (d_h.abs() > 10 * bound).sum() >= 3  # the check has teeth: most picked edges have a clear effect


def test_eap_ig_with_one_step_equals_eap(toy, names_task):
    """m = 1: the single point is the clean input, so EAP-IG is EAP computed another way (the ablated outputs
    rebuilt as out - (clean - abl)): equal to float32 rounding of the sender outputs (measured 9 eps x
    max|score|; 64 eps)."""
    eap = edge_scores(toy, names_task, method="eap").scores
    ig = edge_scores(toy, names_task, method="eap-ig", steps=1).scores
    assert (eap - ig).abs().max() <= 64 * EPS * float(eap.abs().max())
    assert eap.abs().max() > 0


def test_chunks_do_not_change_scores(toy, names_task):
    whole = edge_scores(toy, names_task, method="eap-ig", steps=4)
    for chunk in (1, 3):  # one prompt per backward; both prompts with one point per backward
        chunked = edge_scores(toy, names_task, method="eap-ig", steps=4, chunk=chunk)
        assert (whole.scores - chunked.scores).abs().max() <= 64 * EPS * float(whole.scores.abs().max())
    eap = edge_scores(toy, names_task, method="eap")
    eap_split = edge_scores(toy, names_task, method="eap", chunk=1)
    assert (eap.scores - eap_split.scores).abs().max() <= 64 * EPS * float(eap.scores.abs().max())
    assert abs(eap.full_metric - eap_split.full_metric) <= 64 * EPS * abs(eap.full_metric)
    one = edge_scores(toy, names_task, method="eap", ablation="corrupt").scores
    assert (whole.scores - one).abs().max() > 1e3 * EPS * float(one.abs().max())  # interpolation matters


@pytest.mark.parametrize("metric, positions", [(None, "last"), ("kl", "last"), ("l2", "all")])
def test_exact_effects_equal_single_edge_masked_runs(toy, names_task, metric, positions):
    """exact batches many coefficient rows per forward, restarts each at its receivers' layer and (for
    metrics of the answer position) unembeds that position only; the oracle runs one full forward per
    row. Equal to float32 rounding: the logits of the two agree to 64 eps x max|logit| (masked-run
    tolerance, tests/unit/graph/test_masked.py), which moves a logit difference, a log-prob or a KL by at
    most twice that, an effect (a difference of two metrics) by 4x; plus 64 eps x max|m| for the sums
    over prompts and vocabulary (l2)."""
    exact = edge_scores(toy, names_task, method="exact", chunk=7, metric=metric, positions=positions)
    graph = exact.graph
    edges = some_edges(graph)
    rows = torch.ones(len(edges) + 1, graph.n_edges)
    rows[torch.arange(len(edges)), edges] = 0.0
    m = masked_metric(toy, names_task, rows, metric=metric, positions=positions)
    want = (m[:-1] - m[-1]).float()
    with torch.no_grad():
        logit_scale = max(float(toy.bridge(b.clean).abs().max()) for b in names_task.prepare(toy).batches)
    bound = 64 * EPS * float(m.abs().max()) + 4 * 64 * EPS * logit_scale
    assert (exact.scores[edges] - want).abs().max() <= bound
    assert abs(exact.full_metric - float(m[-1])) <= bound
    assert want.abs().max() > 10 * bound


@pytest.mark.parametrize("metric", [None, "kl"])
def test_answer_position_metrics_on_hf_gpt2(architecture_models, names_task, metric):
    """Metrics of the answer position unembed only that position. HF GPT-2 reshapes the hidden states to the
    full sequence after its final norm, so the read positions are gathered at the unembedding's input (as on
    every model): EAP-IG equals the coefficient gradient of full-logit masked runs (tolerance as in
    test_scores_gradients.py) and exact the single-edge masked runs (tolerance as in
    test_exact_effects_equal_single_edge_masked_runs; with the logit difference only: single-edge KL
    effects of this near-uniform random GPT-2 are below that tolerance)."""
    model = architecture_models("hf_gpt2", words=TOY_WORDS, n_layers=2)
    got = edge_scores(model, names_task, method="eap-ig", steps=2, metric=metric).scores
    want = coefficient_scores(model, names_task, "eap-ig", 2, metric)
    assert want.abs().max() > 0 and (got - want).abs().max() <= bound(want)
    if metric is not None:
        return
    exact = edge_scores(model, names_task, method="exact", metric=metric)
    edges = some_edges(exact.graph)
    rows = torch.ones(len(edges) + 1, exact.graph.n_edges)
    rows[torch.arange(len(edges)), edges] = 0.0
    m = masked_metric(model, names_task, rows, metric=metric)
    effects = (m[:-1] - m[-1]).float()
    with torch.no_grad():
        logit_scale = max(float(model.bridge(b.clean).abs().max()) for b in names_task.prepare(model).batches)
    tolerance = 64 * EPS * float(m.abs().max()) + 4 * 64 * EPS * logit_scale
    assert (exact.scores[edges] - effects).abs().max() <= tolerance
    assert effects.abs().max() > 10 * tolerance


def test_exact_restarts_at_the_receiver_layer(toy, names_task):
    """Edges by receiver layer, latest first, `chunk` per forward, each forward restarted at its earliest
    receiver's layer: block l runs once for the recorded clean run plus once per forward starting at or
    before l; the numbers equal unrestarted full runs (the single-run oracle is
    test_exact_effects_equal_single_edge_masked_runs)."""
    prepared = names_task.prepare(toy)
    engine = MaskedEdgeEngine(toy)
    scorer = discovery_metric(prepared)
    inputs = BatchInputs.build(engine, prepared.batches[0], "corrupt", scorer)
    calls = [0] * len(toy.bridge.blocks)

    def count(i):
        def hook(module, args):
            calls[i] += 1
        return hook

    handles = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(toy.bridge.blocks)]
    try:
        sums, full = exact_sums(engine, inputs, scorer, chunk=7)
    finally:
        for handle in handles:
            handle.remove()
    ordered = sorted(engine.edge_layer.tolist(), reverse=True)
    starts = [min(ordered[i:i + 7]) for i in range(0, len(ordered), 7)]  # each forward's restart layer
    assert calls == [1 + sum(start <= layer for start in starts) for layer in range(len(calls))]  # +1: record
    assert calls[0] < len(starts)  # most forwards skipped block 0
    rows = torch.ones(engine.graph.n_edges, engine.graph.n_edges) - torch.eye(engine.graph.n_edges)
    with torch.no_grad():
        logits = engine.run(inputs.tokens, rows, inputs.ablated, max_batch=14)  # full runs, 7 rows each
        repeated, _ = inputs.repeated(engine.graph.n_edges)
        values = scorer(logits.reshape(-1, *logits.shape[2:]), repeated).view(engine.graph.n_edges, -1).sum(1)
    assert (sums - (values - full)).abs().max() <= 64 * EPS * float(values.abs().max())


def test_attention_only_model_and_every_ablation(toy_attn_only, names_task):
    for ablation in ("corrupt", "mean", "zero", "resample"):
        result = edge_scores(toy_attn_only, names_task, method="eap", ablation=ablation)
        assert result.scores.shape == (result.graph.n_edges,) and result.scores.isfinite().all()
        assert result.ablation == ablation
    zero = edge_scores(toy_attn_only, names_task, method="eap", ablation="zero").scores
    assert zero.abs().max() > 0


@pytest.mark.parametrize("metric", ["kl", "l2"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_distance_metrics(toy, names_task, metric, positions):
    """kl / l2 are 0 at the full model; ablating every edge moves them above 0. The first-order EAP score
    of a distance is ~0 (the full model is its minimum); EAP-IG's interpolated gradients are not."""
    result = edge_scores(toy, names_task, method="eap-ig", metric=metric, positions=positions)
    assert result.metric == metric and result.positions == positions
    assert abs(result.full_metric) <= 64 * EPS
    assert result.scores.isfinite().all() and result.scores.abs().max() > 0
    exact = edge_scores(toy, names_task, method="exact", metric=metric, positions=positions)
    assert (exact.scores >= -64 * EPS).all()  # a distance to the full model cannot go below 0


def test_bad_inputs(toy, names_task):
    with pytest.raises(DiscoveryError, match="unknown discovery method 'acdc'"):
        edge_scores(toy, names_task, method="acdc")
    with pytest.raises(DiscoveryError, match="unknown ablation"):
        edge_scores(toy, names_task, ablation="noise")
    with pytest.raises(DiscoveryError, match="unknown metric"):
        edge_scores(toy, names_task, metric="accuracy")
    with pytest.raises(DiscoveryError, match="positions all needs kl or l2"):
        edge_scores(toy, names_task, metric="logit_diff", positions="all")
    with pytest.raises(DiscoveryError, match="unknown positions"):
        edge_scores(toy, names_task, metric="kl", positions="first")
    with pytest.raises(DiscoveryError, match="steps must be a positive integer"):
        edge_scores(toy, names_task, method="eap-ig", steps=0)


def test_node_scores_and_records(toy, names_task):
    result = edge_scores(toy, names_task, method="eap")
    both = result.node_scores()
    total = float(result.scores.abs().sum())
    assert abs(sum(both.values()) - 2 * total) <= 1e-5 * total  # every edge counts at its two ends
    out, into = node_scores(result.graph, result.scores, "out"), node_scores(result.graph, result.scores, "in")
    assert into["input"] == 0.0 and out["logits"] == 0.0
    assert all(abs(both[n] - out[n] - into[n]) <= 1e-5 * total for n in both)
    records = result.records()
    assert len(records) == result.graph.n_edges
    assert {r["qkv"] for r in records} == {"q", "k", "v", "-"}
    assert records[0]["edge"] == result.graph.edges[0] and records[0]["sender"] == "input"
    assert result.summary()["n_edges"] == result.graph.n_edges
    with pytest.raises(DiscoveryError, match="scores must have shape"):
        EdgeScoring(result.graph, torch.zeros(3), "eap", "corrupt", "logit_diff", "last")
