"""EAP, EAP-IG and EAP-IG-activations from receiver gradients (one product per group) against the masked
engine's coefficient gradient (the per-edge product at every point), on every architecture the graph
supports; and the activations variant's points against plain forwards with the node's output replaced."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_WORDS

from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import (
    CLEAN_POINT,
    BatchInputs,
    Point,
    _GradientRun,
    edge_scores,
    gradient_points,
)
from circuitlab.graph.masked import MaskedEdgeEngine, mlp_input_hook
from circuitlab.models.hooks import hook_name

EPS = torch.finfo(torch.float32).eps


def coefficient_scores(model, task, method, steps=1, metric=None, positions="last", ablation="corrupt"):
    """The coefficient-gradient reference: EAP = -dm/dc at c = 1 of the masked run; EAP-IG the same at each
    interpolated input with the ablated outputs rebuilt as  out_s(alpha) - (clean_s - abl_s), so that the
    coefficient gradient is (clean_s - abl_s) . dm/d(input of r) there. Mean over prompts and points."""
    prepared = task.prepare(model)
    engine = MaskedEdgeEngine(model)
    scorer = discovery_metric(prepared, metric, positions)
    total = torch.zeros(engine.graph.n_edges, dtype=torch.float64)
    for batch in prepared.batches:
        inputs = BatchInputs.build(engine, batch, ablation, scorer)
        clean = engine.sender_outputs(batch.clean)
        start = inputs.ablated[0].expand_as(clean[0])
        alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
        for alpha in alphas:
            embedded = start + alpha * (clean[0] - start)
            with engine.bridge.hooks(fwd_hooks=[(hook_name("resid_pre", 0), lambda x, hook, e=embedded: e)]):
                ablated = engine.sender_outputs(batch.clean) - (clean - inputs.ablated)
                coefficients = torch.ones(engine.graph.n_edges, requires_grad=True)
                with torch.enable_grad():
                    logits = engine.run(batch.clean, coefficients, ablated)
                    values = scorer(logits, batch, inputs.reference)
                    (grad,) = torch.autograd.grad(values.sum(), coefficients)
            total -= grad.double()
    return (total / (prepared.n_prompts * len(alphas))).float()


def bound(reference):
    """Both ways sum the same products in another order (over points, prompts, positions and d_model, and
    the gradients reach each receiver by another graph): float32 rounding of a few hundred terms, measured
    <= 60 eps x max|score| here; 256 eps. A missing term, a wrong sender or receiver fails by far more."""
    return 256 * EPS * float(reference.abs().max())


@pytest.mark.parametrize("name", ["toy", "toy_attn_only", "gated_silu_gqa", "layernorm_learned_positions",
                                  "bidirectional", "soft_capped", "hf_gemma3", "hf_llama", "hf_gpt2"])
def test_receiver_gradients_equal_the_coefficient_gradient(name, request, architecture_models, names_task):
    model = (request.getfixturevalue(name) if name.startswith("toy")
             else architecture_models(name, words=TOY_WORDS, n_layers=2))
    for method, steps in (("eap", 1), ("eap-ig", 3)):
        got = edge_scores(model, names_task, method=method, steps=steps).scores
        want = coefficient_scores(model, names_task, method, steps)
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= bound(want), (method, float((got - want).abs().max() / bound(want)))


@pytest.mark.parametrize("metric, positions, ablation", [("kl", "all", "mean"), ("l2", "last", "zero"),
                                                         (None, "last", "resample")])
def test_metrics_and_ablations_equal_the_coefficient_gradient(toy, names_task, metric, positions, ablation):
    got = edge_scores(toy, names_task, method="eap-ig", steps=2, metric=metric, positions=positions,
                      ablation=ablation).scores
    want = coefficient_scores(toy, names_task, "eap-ig", 2, metric, positions, ablation)
    assert want.abs().max() > 0 and (got - want).abs().max() <= bound(want)


def test_points():
    """EAP: the clean run; EAP-IG: the input at k / m; EAP-IG-activations: every layer-level node at k / m."""
    from circuitlab.graph.graph import Graph, GraphShape

    graph = Graph(GraphShape(n_layers=2, n_heads=2, d_model=8, attn_only=False))
    assert gradient_points(graph, "eap", 5) == [CLEAN_POINT]
    assert [p.alpha for p in gradient_points(graph, "eap-ig", 4)] == [0.25, 0.5, 0.75, 1.0]
    act = gradient_points(graph, "eap-ig-act", 2)
    assert [p.node for p in act[::2]] == [("input", -1), ("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)]
    assert len(act) == 10 and CLEAN_POINT in act
    assert len(gradient_points(Graph(GraphShape(n_layers=2, n_heads=2, d_model=8, attn_only=True)), "eap-ig-act", 3)) == 9


def replaced_forward(model, engine, tokens, ablated, clean, point, read):
    """The reference forward of one activations point: a plain bridge run with the node's output replaced
    by  alpha clean + (1 - alpha) abl  (attention: hook_attn_out, its heads' sum plus b_O), returning the
    logits and dm/d(input) of the last MLP and of the logits (the readers downstream of every node)."""
    node, alpha = point.node, point.alpha
    graph = engine.graph
    fixed = alpha * clean + (1 - alpha) * ablated.expand_as(clean)
    hooks = []
    if node[0] == "input":
        hooks.append((hook_name("resid_pre", 0), lambda x, hook: fixed[0]))
    elif node[0] == "mlp":
        index = graph.sender_block(node[1]).stop - 1
        hooks.append((hook_name("mlp_out", node[1]), lambda x, hook: fixed[index]))
    else:
        block = graph.sender_block(node[1])
        heads = fixed[block.start:block.start + graph.shape.n_heads].sum(0)
        b_O = engine.layers[node[1]].b_O
        hooks.append((hook_name("attn_out", node[1]), lambda x, hook: heads + (0 if b_O is None else b_O)))
    leaves = {}

    def leaf(key):
        def hook(x, hook):
            leaves[key] = x.view_as(x)
            return leaves[key]
        return hook

    last = graph.shape.n_layers - 1
    hooks += [(mlp_input_hook(model.bridge, last), leaf("mlp")), (engine.final_hook, leaf("logits"))]
    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        grads = torch.autograd.grad(read(logits), [leaves["mlp"], leaves["logits"]])
    return logits.detach(), grads


def test_activation_points_equal_plain_forwards_with_the_node_replaced(toy, names_task):
    """Each point of EAP-IG-activations runs the clean prompt with one node's output set to the constant
    alpha clean + (1 - alpha) abl: its logits, and the gradients at the last MLP's and the logits' input,
    equal a plain forward with that output replaced (same sums; the attention's regrouped per head)."""
    prepared = names_task.prepare(toy)
    engine = MaskedEdgeEngine(toy)
    scorer = discovery_metric(prepared)
    batch = prepared.batches[0]
    inputs = BatchInputs.build(engine, batch, "corrupt", scorer)
    clean = engine.sender_outputs(batch.clean)
    points = [Point(("input", -1), 0.25), Point(("attn", 0), 0.5), Point(("mlp", 0), 0.25),
              Point(("attn", 1), 0.0), CLEAN_POINT]
    run = _GradientRun(engine, inputs.ablated, points, batch.size, capture=len(points) - 1)
    tokens = batch.clean.repeat(len(points), 1)
    repeated, _ = inputs.repeated(len(points))
    with torch.enable_grad():
        logits = engine.bridge.run_with_hooks(tokens, fwd_hooks=run.hooks(None))
        grads = torch.autograd.grad(scorer(logits, repeated).sum(), run.inputs)
    assert (run.sender_outputs() - clean).abs().max() <= 64 * EPS * float(clean.abs().max())
    n = batch.size
    for i, point in enumerate(points):
        rows = slice(i * n, (i + 1) * n)
        want_logits, (want_mlp, want_final) = replaced_forward(
            toy, engine, batch.clean, inputs.ablated, clean, point, lambda x: scorer(x, batch).sum())
        scale = float(want_logits.abs().max())
        assert (logits[rows] - want_logits).abs().max() <= 64 * EPS * scale, point
        for got, want in ((grads[-2][rows], want_mlp), (grads[-1][rows], want_final)):
            assert (got - want).abs().max() <= 64 * EPS * float(want.abs().max()) + EPS, point
    # the attention layer 1 point at alpha = 0 is the corrupt node: its output moved, its inputs get nothing
    assert (logits[3 * n:4 * n] - logits[4 * n:]).abs().max() > 1e3 * EPS
    assert float(grads[2][:, 3 * n:4 * n].abs().max()) == 0.0


def test_activations_variant(toy, names_task):
    """eap-ig-act scores every edge; into the logits, one step (every point clean, one node's output held
    fixed, which the logits' input gradient does not see) gives EAP exactly; its steps are reported."""
    act = edge_scores(toy, names_task, method="eap-ig-act", steps=1)
    eap = edge_scores(toy, names_task, method="eap")
    graph = act.graph
    logits_edges = graph.edge_dst == graph.n_receivers - 1
    assert (act.scores[logits_edges] - eap.scores[logits_edges]).abs().max() <= bound(eap.scores)
    assert act.steps == 1 and act.method == "eap-ig-act" and abs(act.full_metric - eap.full_metric) <= 64 * EPS
    three = edge_scores(toy, names_task, method="eap-ig-act", steps=3)
    assert three.scores.isfinite().all() and (three.scores - act.scores).abs().max() > 1e3 * EPS
    chunked = edge_scores(toy, names_task, method="eap-ig-act", steps=3, chunk=2)
    assert (chunked.scores - three.scores).abs().max() <= bound(three.scores)


def test_activations_variant_recovers_the_ground_truth_circuits():
    """As EAP-IG (tests/unit/discovery/test_ground_truth.py): the hand-set circuit exactly (AUC 1.0; edges
    outside it score 0 in exact arithmetic), the trained one with AUC >= 0.9 (measured 0.994)."""
    from circuitlab.discovery.ground_truth import load_ground_truth, roc_auc

    for name, floor in (("handset-induction", 1.0), ("trained-induction", 0.9)):
        model, task, truth = load_ground_truth(name, n=8)
        scoring = edge_scores(model, task, method="eap-ig-act")
        assert roc_auc(scoring.scores, truth.in_graph) >= floor, name


def test_eap_ig_act_entry(tmp_path, toy, names_task):
    from circuitlab.runner import run

    done = run("discover/eap-ig-act", model=toy, task=names_task, out=tmp_path / "act", steps=1, top_n=5,
               curve=False)
    summary = done.output.summary()
    assert summary["method"] == "eap-ig-act" and summary["steps"] == 1 and summary["circuit_edges"] <= 5
    assert (tmp_path / "act" / "circuit.json").exists()
