"""Parameter-gradient importance (``discover/grad``): which heads and MLPs the task metric is most sensitive to.

One forward and one backward per token-length group (the weights themselves are never changed) give the
gradient of the task metric m (mean over the task's prompts) with respect to every parameter w. Per node:

- ``abs_grad``        = sum over the node's parameters of |dm/dw|
- ``abs_grad_x_weight`` = sum of |w dm/dw| (first-order Taylor importance, Molchanov et al. 2017, "Pruning
  convolutional neural networks for resource efficient inference")
- ``grad_x_weight``   = sum of w dm/dw (signed): minus the first-order estimate of the change of m when the
  node's weights are set to 0; it also equals dm/d(alpha) for the node's output (or input projection) scaled
  by alpha at alpha = 1, which is how the tests check the slices.

A head's parameters are its slices of W_Q, b_Q, W_K, b_K, W_V, b_V and W_O, read through the bridge's own
per-head views (``blocks[l].attn.W_Q`` etc., [head, d_model, d_head]), so the slicing follows whatever
weight layout the architecture stores. Under grouped-query attention a key/value head's W_K, b_K, W_V, b_V
slice is shared by the query heads of its group: each of them is credited with 1/group size of it, so the
node totals still add up. An MLP's parameters are all of ``blocks[l].mlp`` (in, gate, out weights and
biases). Parameters no node owns (embeddings, unembedding, norms, the attention output bias b_O, q/k norms)
are reported together as ``unattributed``.

Nodes are flagged when abs_grad_x_weight exceeds mean + 3 std of their kind (heads against heads, MLPs
against MLPs: an MLP has an order of magnitude more parameters than a head, so one scale would flag every
MLP). The circuit keeps the flagged nodes (or the top_n nodes by that standardised score) with every edge
among them, from the input and to the logits; its faithfulness is measured with corrupt ablation.
A distance metric (kl, l2) cannot be used: the full model is its minimum, where its gradient is 0.
See docs/METHODS.md, "Parameter-gradient importance".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.discovery.metrics import DISTANCE_METRICS, check_metric_name, discovery_metric
from circuitlab.discovery.nodes import NodeDiscovery, measure_nodes
from circuitlab.discovery.selection import check_top_n
from circuitlab.errors import DiscoveryError
from circuitlab.graph.graph import Graph
from circuitlab.graph.naming import head_name, mlp_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FLAG_STDS = 3.0  # flagged: above mean + 3 std of the node's kind
HEAD_VIEWS = (("W_Q", "b_Q", False), ("W_K", "b_K", True), ("W_V", "b_V", True))  # (weight, bias, per kv head)


def check_grad_metric(metric: str | None) -> str | None:
    """A task metric (or None: the task's own); kl / l2 are rejected, their gradient at the full model is 0."""
    if metric in DISTANCE_METRICS:
        raise DiscoveryError(
            f"--metric {metric} does not apply to parameter-gradient importance: {metric} measures the distance to "
            "the full model, which is its minimum, so its gradient there is 0; use a task metric (logit_diff, "
            "logprob, prob)")
    return check_metric_name(metric)


# --- gradients ---------------------------------------------------------------------------------------------

@dataclass
class SliceSums:
    """Sums over a set of parameters: |grad|, |grad x w|, grad x w, and how many parameters."""

    abs_grad: float = 0.0
    abs_gxw: float = 0.0
    gxw: float = 0.0
    n_params: int = 0

    def add(self, weight: torch.Tensor, grad: torch.Tensor, share: float = 1.0) -> None:
        product = (weight.double() * grad.double())
        self.abs_grad += share * float(grad.double().abs().sum())
        self.abs_gxw += share * float(product.abs().sum())
        self.gxw += share * float(product.sum())
        self.n_params += round(share * weight.numel())


def metric_gradients(model: Model, prepared: PreparedTask, metric: str | None = None
                     ) -> tuple[dict[torch.nn.Parameter, torch.Tensor], float, str]:
    """dm/dw for every parameter (m: the metric's mean over the prompts), m itself and the metric's name.

    One forward + backward per token-length group; requires_grad and existing .grad fields are restored.
    """
    scorer = discovery_metric(prepared, check_grad_metric(metric))
    check_grad_metric(scorer.name)  # the task's own metric may be kl too
    params = list(dict.fromkeys(model.bridge.parameters()))
    saved = [(p.requires_grad, p.grad) for p in params]
    total = 0.0
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with progress_bar(len(prepared.batches), "gradient of the metric") as advance:
            for batch in prepared:
                values = scorer(model.bridge(batch.clean, return_type="logits"), batch)
                (values.sum() / prepared.n_prompts).backward()
                total += float(values.detach().sum())
                advance(1)
        grads = {p: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for p in params}
    finally:
        for p, (flag, grad) in zip(params, saved, strict=True):
            p.grad = grad
            p.requires_grad_(flag)
    return grads, total / prepared.n_prompts, scorer.name


@contextmanager
def _grads_as_data(grads: dict[torch.nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Every parameter temporarily holds its gradient: the bridge's per-head views then show gradients in the
    same layout as the weights (whatever the architecture stores: Linear, Conv1D, fused or not)."""
    saved = {p: p.data for p in grads}
    try:
        for p, g in grads.items():
            p.data = g
        yield
    finally:
        for p, data in saved.items():
            p.data = data


def _attn_views(attn: Any) -> dict[str, torch.Tensor]:
    """The per-head views of one attention layer: W_Q [H, d_model, d_head], b_Q [H, d_head], W_K/W_V and
    b_K/b_V per kv head, W_O [H, d_head, d_model] (biases absent from bias-free models)."""
    views = {}
    with torch.no_grad():
        for weight, bias, _ in HEAD_VIEWS:
            views[weight] = getattr(attn, weight).detach().clone()
            b = getattr(attn, bias)
            if b is not None:
                views[bias] = b.detach().clone()
        views["W_O"] = attn.W_O.detach().clone()
    return views


def _head_owned(attn: Any) -> list[torch.nn.Parameter]:
    """The leaf parameters the per-head views read (q, k, v weights and biases, o weight)."""
    owned = [attn.q.weight, attn.k.weight, attn.v.weight, attn.o.weight]
    owned += [b for b in (attn.q.bias, attn.k.bias, attn.v.bias) if b is not None]
    for p in owned:
        if not isinstance(p, torch.nn.Parameter):
            raise DiscoveryError(f"{type(attn).__name__}: its q/k/v/o weights are not parameters of the model "
                                 "(a computed view); parameter-gradient importance cannot slice them per head")
    return owned


@dataclass
class GradImportance:
    """Per node (heads and MLPs in graph order): gradient sums, the standardised score and the flag."""

    nodes: list[str]
    kinds: list[str]
    layers: list[int]
    heads: list[int | None]
    sums: list[SliceSums]
    unattributed: SliceSums
    metric: str
    metric_value: float
    n_prompts: int
    flagged: list[bool] = field(default_factory=list)
    z: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.z:
            self.z = _standardised([s.abs_gxw for s in self.sums], self.kinds)
            self.flagged = [z > FLAG_STDS for z in self.z]

    def scores(self) -> dict[str, float]:
        return {n: s.abs_gxw for n, s in zip(self.nodes, self.sums, strict=True)}

    def ranking(self) -> list[int]:
        """Node indices, most important first: by standardised score (heads and MLPs on their own scales)."""
        return sorted(range(len(self.nodes)), key=lambda i: (-self.z[i], i))

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for rank, i in enumerate(self.ranking()):
            s = self.sums[i]
            rows.append({"node": self.nodes[i], "kind": self.kinds[i], "layer": self.layers[i], "head": self.heads[i],
                         "abs_grad": s.abs_grad, "abs_grad_x_weight": s.abs_gxw, "grad_x_weight": s.gxw,
                         "n_params": s.n_params, "z": self.z[i], "flagged": self.flagged[i], "rank": rank})
        return rows


def _standardised(values: list[float], kinds: list[str]) -> list[float]:
    """(value - mean) / std within each kind (population std); 0 for a kind whose values are all equal."""
    out = [0.0] * len(values)
    for kind in set(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        v = torch.tensor([values[i] for i in idx], dtype=torch.float64)
        std = float(v.std(unbiased=False))
        for i, x in zip(idx, v.tolist(), strict=True):
            out[i] = (x - float(v.mean())) / std if std > 0 else 0.0
    return out


def grad_importance(model: Model, task: Task | PreparedTask, *, metric: str | None = None) -> GradImportance:
    """|grad|, |grad x w| and grad x w of the task metric, aggregated per head and per MLP (module docstring)."""
    prepared = task if isinstance(task, PreparedTask) else task.prepare(model)
    grads, value, name = metric_gradients(model, prepared, metric)
    bridge, cfg = model.bridge, model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    attns = [bridge.blocks[layer].attn for layer in range(model.n_layers)]
    weights = [_attn_views(a) for a in attns]
    with _grads_as_data(grads):
        grad_views = [_attn_views(a) for a in attns]
    nodes: list[str] = []
    kinds: list[str] = []
    layers: list[int] = []
    heads: list[int | None] = []  # None for an MLP
    sums: list[SliceSums] = []
    owned: set[torch.nn.Parameter] = set()
    attn_only = bool(getattr(cfg, "attn_only", False))
    for layer in range(model.n_layers):
        w, g = weights[layer], grad_views[layer]
        owned |= set(_head_owned(attns[layer]))
        for h in range(n_heads):
            s = SliceSums()
            for weight, bias, per_kv in HEAD_VIEWS:
                index, share = (h // group, 1.0 / group) if per_kv else (h, 1.0)
                s.add(w[weight][index], g[weight][index], share)
                if bias in w:
                    s.add(w[bias][index], g[bias][index], share)
            s.add(w["W_O"][h], g["W_O"][h])
            nodes.append(head_name(layer, h))
            kinds.append("head")
            layers.append(layer)
            heads.append(h)
            sums.append(s)
        if not attn_only:
            s = SliceSums()
            for p in dict.fromkeys(bridge.blocks[layer].mlp.parameters()):
                s.add(p.detach(), grads[p])
                owned.add(p)
            nodes.append(mlp_name(layer))
            kinds.append("mlp")
            layers.append(layer)
            heads.append(None)
            sums.append(s)
    rest = SliceSums()
    for p, grad in grads.items():
        if p not in owned:
            rest.add(p.detach(), grad)
    return GradImportance(nodes, kinds, layers, heads, sums, rest, name, value, prepared.n_prompts)


# --- the discover/grad analysis ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GradParams:
    """score_metric: a task metric (the task's own when None; not kl / l2). top_n: keep the n nodes with the
    highest standardised score (default: the flagged ones, above mean + 3 std of their kind). seed: unused
    by the gradient (deterministic), kept for the faithfulness evaluator's resampling. curve: measure the
    faithfulness curve over the number of kept nodes (one masked forward per point)."""

    score_metric: str | None = None
    top_n: int | None = None
    seed: int = 0
    curve: bool = True

    def __post_init__(self) -> None:
        check_grad_metric(self.score_metric)
        if self.top_n is not None:
            check_top_n(self.top_n)


def grad_figure(importance: GradImportance) -> Figure:
    """grad.png: |grad x w| per node, sorted, one panel per kind, the flag line (mean + 3 std) dashed."""
    from matplotlib.figure import Figure

    kinds = [k for k in ("head", "mlp") if k in importance.kinds]
    fig = Figure(figsize=(7.0, 2.6 * len(kinds) + 0.6), dpi=130)
    axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds, strict=True):
        idx = [i for i in range(len(importance.nodes)) if importance.kinds[i] == kind]
        idx.sort(key=lambda i: -importance.sums[i].abs_gxw)
        values = [importance.sums[i].abs_gxw for i in idx]
        colours = ["#d62728" if importance.flagged[i] else "#1f77b4" for i in idx]
        ax.bar(range(len(idx)), values, color=colours)
        v = torch.tensor(values, dtype=torch.float64)
        ax.axhline(float(v.mean() + FLAG_STDS * v.std(unbiased=False)), color="#7f7f7f", ls="--", lw=0.8,
                   label="mean + 3 std (flag)")
        shown = min(len(idx), 30)  # label the strongest 30; the rest are bars only
        ax.set_xticks(range(shown), [importance.nodes[i] for i in idx[:shown]], rotation=90, fontsize=6)
        ax.set_ylabel("|grad x w|", fontsize=8)
        ax.set_title(f"{kind}s ranked by |grad x weight| of {importance.metric} (red: flagged)", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def discover_grad(model: Model, task: Task | None, params: GradParams) -> NodeDiscovery:
    """Gradient importance per node, the circuit of the flagged (or top_n) nodes and its faithfulness."""
    assert task is not None  # the entry requires a task
    graph = Graph.from_model(model)
    prepared = task.prepare(model)
    importance = grad_importance(model, prepared, metric=params.score_metric)
    ranked = [importance.nodes[i] for i in importance.ranking()]
    if params.top_n is not None:
        if params.top_n > len(ranked):
            raise DiscoveryError(f"top-n {params.top_n} is larger than the number of nodes ({len(ranked)} heads and "
                                 "MLPs); choose at most that")
        selection: tuple[str, float] = ("top_n", params.top_n)
        kept = ranked[:params.top_n]
    else:
        kept = [n for n in ranked if importance.flagged[importance.nodes.index(n)]]
        selection = ("flagged", FLAG_STDS)
    circuit, faithful, curve = measure_nodes(model, prepared, graph, kept, ranked, metric=importance.metric,
                                             seed=params.seed, curve=params.curve)
    rest = importance.unattributed
    info = {"metric": importance.metric, "metric_value": importance.metric_value, "n_prompts": importance.n_prompts,
            "n_flagged": sum(importance.flagged), "unattributed_abs_grad_x_weight": rest.abs_gxw,
            "unattributed_params": rest.n_params, "ablation": "corrupt",
            "strongest_nodes": [f"{n} ({importance.scores()[n]:.4g})" for n in ranked[:5]]}
    return NodeDiscovery("grad", circuit, kept, importance.scores(), importance.records(), faithful, curve,
                         selection, info, {"grad.png": grad_figure(importance)})
