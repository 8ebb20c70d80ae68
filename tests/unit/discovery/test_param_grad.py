"""Parameter-gradient importance: the per-head slices are the right ones (checked against autograd on a scale
of each head's activations), every parameter is counted once, and the hand-set induction model's true heads
rank first."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_WORDS

from circuitlab.discovery.ground_truth import INDUCTION_HEAD, PREV_HEAD, load_ground_truth
from circuitlab.discovery.param_grad import (
    GradParams,
    check_grad_metric,
    discover_grad,
    grad_importance,
    metric_gradients,
)
from circuitlab.errors import DiscoveryError
from circuitlab.graph.naming import head_name
from circuitlab.models.hooks import hook_name
from circuitlab.models.toy import toy_model

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def gqa():
    """Four query heads sharing two key/value heads."""
    return toy_model(words=TOY_WORDS, n_layers=2, n_key_value_heads=2, seed=3)


def scaled_derivative(model, prepared, layer: int, heads: list[int], kv_heads: list[int]) -> float:
    """dm/d(alpha) at alpha = 1, alpha scaling q and z of `heads` and k, v of `kv_heads` at `layer`: by
    linearity the same as scaling those heads' W_Q, b_Q, W_O rows and the kv heads' W_K, b_K, W_V, b_V."""
    alpha = torch.ones((), requires_grad=True)

    def scale(index: list[int]):
        def hook(activation, hook):  # [batch, pos, head, d_head]
            factor = torch.ones(activation.shape[2])
            factor = factor.index_put((torch.tensor(index),), alpha.expand(len(index)))
            return activation * factor[:, None]
        return hook

    hooks = [(hook_name("q", layer), scale(heads)), (hook_name("z", layer), scale(heads)),
             (hook_name("k", layer), scale(kv_heads)), (hook_name("v", layer), scale(kv_heads))]
    total = 0.0
    with model.bridge.hooks(fwd_hooks=hooks):
        for batch in prepared:
            total = total + prepared.metric(model.bridge(batch.clean, return_type="logits"), batch).sum()
    (grad,) = torch.autograd.grad(total / prepared.n_prompts, alpha)
    return float(grad)


def tolerance(importance, nodes) -> float:
    # Float32 sums of |g w| products: each term is exact to a few eps, the sums run over ~10^3 terms.
    return 1e3 * EPS * max(1e-3, sum(importance.sums[importance.nodes.index(n)].abs_gxw for n in nodes))


def test_head_slices_match_autograd_on_the_heads_activations(toy, names_task):
    prepared = names_task.prepare(toy)
    importance = grad_importance(toy, prepared)
    for layer in range(toy.n_layers):
        for h in range(toy.cfg.n_heads):
            node = head_name(layer, h)
            want = scaled_derivative(toy, prepared, layer, [h], [h])
            got = importance.sums[importance.nodes.index(node)].gxw
            assert abs(got - want) <= tolerance(importance, [node]), (node, got, want)
    assert max(abs(s.gxw) for s in importance.sums) > 1e-3  # the identity is not 0 = 0


def test_gqa_groups_share_their_key_value_slices(gqa, names_task):
    """A kv head's W_K / W_V slice is split equally among its query group: the group's sum is exact."""
    prepared = names_task.prepare(gqa)
    importance = grad_importance(gqa, prepared)
    group = gqa.cfg.n_heads // gqa.cfg.n_key_value_heads
    for layer in range(gqa.n_layers):
        for g in range(gqa.cfg.n_key_value_heads):
            heads = list(range(g * group, (g + 1) * group))
            nodes = [head_name(layer, h) for h in heads]
            want = scaled_derivative(gqa, prepared, layer, heads, [g])
            got = sum(importance.sums[importance.nodes.index(n)].gxw for n in nodes)
            assert abs(got - want) <= tolerance(importance, nodes), (nodes, got, want)


def test_every_parameter_is_counted_once(gqa, names_task):
    prepared = names_task.prepare(gqa)
    importance = grad_importance(gqa, prepared)
    grads, value, _ = metric_gradients(gqa, prepared)
    n_params = sum(p.numel() for p in grads)
    assert sum(s.n_params for s in importance.sums) + importance.unattributed.n_params == n_params
    total = sum(float((p.detach().double() * g.double()).abs().sum()) for p, g in grads.items())
    counted = sum(s.abs_gxw for s in importance.sums) + importance.unattributed.abs_gxw
    assert abs(counted - total) <= 1e-9 * total  # float64 sums of the same products, in another order
    assert value == pytest.approx(importance.metric_value)


def test_gradients_leave_the_model_as_they_found_it(toy, names_task):
    params = list(toy.bridge.parameters())
    before = [(p.requires_grad, p.grad, p.detach().clone()) for p in params[:4]]
    grad_importance(toy, names_task)
    for p, (flag, grad, data) in zip(params[:4], before, strict=False):
        assert p.requires_grad == flag and p.grad is grad and torch.equal(p.detach(), data)


def test_handset_true_heads_rank_first():
    """Every other head of the hand-set model has zero weights, hence exactly zero gradient (its W_V and W_O
    are 0, so no path through it reaches the metric): the two true heads are first by any threshold."""
    model, task, _ = load_ground_truth("handset-induction", n=4)
    importance = grad_importance(model, task)
    true = {head_name(*PREV_HEAD), head_name(*INDUCTION_HEAD)}
    top = {importance.nodes[i] for i in importance.ranking()[:2]}
    assert top == true
    for node, s in zip(importance.nodes, importance.sums, strict=True):
        if node in true:
            assert s.abs_grad > 0 and s.abs_gxw > 0
        else:
            assert s.abs_grad == 0 and s.abs_gxw == 0
    result = discover_grad(model, task, GradParams(top_n=2))
    assert set(result.kept) == true
    assert result.faithfulness == pytest.approx(1.0, abs=64 * EPS)
    assert {r["node"] for r in result.records() if r["in_circuit"]} == true
    assert set(result.figures()) >= {"grad.png", "circuit.png", "faithfulness.png"}


def test_flags_are_above_mean_plus_three_std(toy, names_task):
    importance = grad_importance(toy, names_task)
    for kind in ("head", "mlp"):
        idx = [i for i, k in enumerate(importance.kinds) if k == kind]
        values = torch.tensor([importance.sums[i].abs_gxw for i in idx], dtype=torch.float64)
        bound = values.mean() + 3 * values.std(unbiased=False)
        assert [importance.flagged[i] for i in idx] == [bool(v > bound) for v in values]


def test_distance_metrics_and_bad_options_are_rejected():
    for metric in ("kl", "l2"):
        with pytest.raises(DiscoveryError, match="gradient there is 0"):
            check_grad_metric(metric)
        with pytest.raises(DiscoveryError, match="gradient there is 0"):
            GradParams(score_metric=metric)
    with pytest.raises(DiscoveryError, match="unknown metric"):
        GradParams(score_metric="bogus")
    with pytest.raises(DiscoveryError, match="non-negative integer"):
        GradParams(top_n=-1)


def test_top_n_larger_than_the_node_count_is_a_clear_error(toy, names_task):
    with pytest.raises(DiscoveryError, match="number of nodes"):
        discover_grad(toy, names_task, GradParams(top_n=100))
