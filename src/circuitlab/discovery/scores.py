"""Edge scores: how much the metric changes when one edge of the graph is ablated.

For an edge s -> r the score is  m(edge ablated) - m(full model),  averaged over the task's prompts, where
"ablated" replaces the sender's contribution to that receiver's input by its ablated output (corrupt prompt,
mean, zero or resample; see graph/ablation.py). Four ways to get it:

- **EAP** (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery"), first order::

      score(s -> r) ~ (abl_s - out_s) . dm/d(input of r)

  This is minus the masked-edge engine's coefficient gradient at c = 1 (a receiver's input there is
  sum_s c_sr out_s + (1 - c_sr) abl_s). It is computed without the coefficients: one ablated forward (for
  abl_s), one clean forward in which every receiver's input is a tensor of its own (the per-head q/k/v
  streams, the MLP's and the logits' input), one backward for dm/d(input of r) of every receiver, then one
  matmul per receiver layer for every edge at once.
- **EAP-IG** (Hanna et al. 2024, "Have Faith in Faithfulness"), the "inputs" variant: the gradient is
  averaged over `steps` points on the straight line from the ablated to the clean input embeddings,
  alpha = k / steps for k = 1..steps, and multiplied by the fixed difference (abl_s - clean out_s). The
  difference does not depend on the point, so the receivers' gradients are summed over the points first and
  the product is formed once. With steps = 1 the only point is the clean input, which is EAP.
- **EAP-IG-activations** ("eap-ig-act"; Hanna et al. 2024, MIB's EAP-IG-activations): the same product, the
  gradients averaged over points that set one layer-level node's output (the input embeddings, one
  attention layer's heads, one MLP) to  alpha clean + (1 - alpha) ablated  while the rest of the model runs
  on the clean prompt, for every such node in turn (steps x (2 layers + 1) points, as in EAP-IG's reference
  implementation). The node's own inputs get no gradient at its points.
- **exact**: the masked run with that one edge's coefficient set to 0, many edges per forward (one
  coefficient row each). No approximation: the reference the others are scored against on small
  graphs. Edges are grouped by their receiver's layer r and each group's runs restart at layer r from
  one recorded clean run (`MaskedEdgeEngine.record`): nothing before r can change, so only blocks
  r..L-1 run (edges into the logits: only the final norm and unembedding).

See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.discovery.metrics import (
    DISTANCE_METRICS,
    DiscoveryMetric,
    check_metric_name,
    discovery_metric,
)
from circuitlab.errors import DiscoveryError
from circuitlab.graph.ablation import ABLATIONS, ablated_outputs
from circuitlab.graph.attention import visible_keys
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import FwdHooks, HookFn, MaskedEdgeEngine, read_positions_hooks
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.metrics import OUTPUT_PREFIX, needs_answers
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("eap", "eap-ig", "eap-ig-act", "exact")
STEP_METHODS = ("eap-ig", "eap-ig-act")  # the methods that integrate over interpolation points (`steps`)
EdgeVector = Float[torch.Tensor, " edge"]
SenderOutputs = Float[torch.Tensor, "sender batch_or_1 pos d_model"]


@dataclass
class EdgeScoring:
    """Scores of every edge, in `graph.edges` order: m(edge ablated) - m(full), mean over prompts.

    Negative = ablating the edge lowers the metric (for a task metric such as logit_diff: the edge helps the
    task); for `kl` / `l2` (0 at the full model) larger = more important.
    """

    graph: Graph
    scores: EdgeVector
    method: str
    ablation: str
    metric: str
    positions: str
    steps: int | None = None
    n_prompts: int = 0
    full_metric: float = math.nan  # mean metric of the full model under this metric
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.scores.shape) != (self.graph.n_edges,):
            raise DiscoveryError(f"scores must have shape [{self.graph.n_edges}], got {tuple(self.scores.shape)}")

    # --- views ----------------------------------------------------------------------------------------
    def node_scores(self, direction: str = "both", *, absolute: bool = True) -> dict[str, float]:
        """node -> sum of its edges' scores (|score| when absolute): out-edges, in-edges or both."""
        return node_scores(self.graph, self.scores, direction, absolute=absolute)

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n edges with the largest |score|, strongest first."""
        order = torch.argsort(self.scores.abs(), descending=True)[:n].tolist()
        return [(self.graph.edges[e], float(self.scores[e])) for e in order]

    # --- AnalysisResult -------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """One row per edge: edge, sender, receiver node, receiver input (q/k/v or '-'), score."""
        qkv = self.graph.edge_receiver_qkv
        rows = []
        for e, (name, score) in enumerate(zip(self.graph.edges, self.scores.tolist(), strict=True)):
            sender, receiver = name.split("->")
            rows.append({"edge": name, "sender": sender, "receiver": receiver.split("<")[0],
                         "qkv": qkv[e] or "-", "score": score})
        return rows

    def summary(self) -> dict[str, Any]:
        strongest = self.top(1)
        return {"method": self.method, "ablation": self.ablation, "metric": self.metric,
                "positions": self.positions, "steps": self.steps, "n_edges": self.graph.n_edges,
                "n_prompts": self.n_prompts, "full_metric": self.full_metric,
                "strongest_edge": strongest[0][0] if strongest else None,
                "strongest_score": strongest[0][1] if strongest else None,
                "sum_abs_score": float(self.scores.abs().sum()), **self.extra}

    def figures(self) -> dict[str, Figure]:
        return {}


def node_scores(graph: Graph, scores: EdgeVector, direction: str = "both", *,
                absolute: bool = True) -> dict[str, float]:
    """Node scores from edge scores: the sum over a node's out-edges ("out"), in-edges ("in") or both."""
    if direction not in ("in", "out", "both"):
        raise DiscoveryError(f"direction must be 'in', 'out' or 'both', got {direction!r}")
    values = scores.abs() if absolute else scores
    total = torch.zeros(len(graph.nodes), dtype=values.dtype)
    if direction in ("out", "both"):
        total.index_add_(0, graph.edge_src, values)  # senders share the node order's first indices
    if direction in ("in", "both"):
        node_index = {n: i for i, n in enumerate(graph.nodes)}
        receiver_node = torch.tensor([node_index[r.split("<")[0]] for r in graph.receivers])
        total.index_add_(0, receiver_node[graph.edge_dst], values)
    return {n: float(v) for n, v in zip(graph.nodes, total.tolist(), strict=True)}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise DiscoveryError(f"unknown discovery method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise DiscoveryError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    return ablation


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DiscoveryError(f"steps must be a positive integer (EAP-IG interpolation points), got {steps!r}")
    return steps


def scoring_setup(model: Model, task: Task | PreparedTask, *, ablation: str, metric: str | None, positions: str,
                  graph: Graph | None) -> tuple[PreparedTask, MaskedEdgeEngine, DiscoveryMetric]:
    """Checked options, the prepared task, the masked engine and the metric that every edge-scoring method
    (and ACDC) starts from; a task metric that reads answers needs a task that has them."""
    check_ablation(ablation)
    check_metric_name(metric, positions)
    prepared = task if isinstance(task, PreparedTask) else task.prepare(model)
    engine = MaskedEdgeEngine(model, graph)
    scorer = discovery_metric(prepared, metric, positions)
    if not scorer.needs_reference and needs_answers(scorer.name) and not prepared.task.has_answers:
        raise DiscoveryError(f"task {prepared.task.name!r} has examples without an answer, which the metric "
                             f"{scorer.name!r} scores; give every example an answer, or score with kl or l2")
    return prepared, engine, scorer


# --- the verb ------------------------------------------------------------------------------------------

def edge_scores(model: Model, task: Task | PreparedTask, *, method: str = "eap-ig", ablation: str = "corrupt",
                metric: str | None = None, positions: str = "last", steps: int = 5, graph: Graph | None = None,
                seed: int = 0, chunk: int | None = None) -> EdgeScoring:
    """Score every edge of the model's graph on `task` (every token-length group, weighted by its size).

    method: "eap" | "eap-ig" | "eap-ig-act" | "exact"; ablation: "corrupt" | "mean" | "zero" | "resample" (mean and
    resample draw from the group's clean prompts); metric: the task's own by default, or "kl" / "l2";
    positions: "last" (answer position) or "all"; steps: EAP-IG interpolation points; chunk: rows per
    forward pass: prompts x points (EAP, EAP-IG, EAP-IG-activations; default: about 2 GiB of activations for the
    backward) or edges (exact; default: about 256 MB of logits).
    """
    check_method(method)
    check_steps(steps)
    prepared, engine, scorer = scoring_setup(model, task, ablation=ablation, metric=metric, positions=positions,
                                             graph=graph)
    total = torch.zeros(engine.graph.n_edges)
    full = 0.0
    points = [] if method == "exact" else gradient_points(engine.graph, method, steps)
    per_prompt = engine.graph.n_edges if method == "exact" else len(points)
    with progress_bar(prepared.n_prompts * per_prompt, f"{method} edge scores") as advance:
        for batch in prepared.batches:
            inputs = BatchInputs.build(engine, batch, ablation, scorer, seed=seed)
            if method == "exact":
                sums, full_sum = exact_sums(engine, inputs, scorer, chunk=chunk,
                                            advance=lambda k, size=batch.size: advance(k * size))
                total += sums
                full += full_sum
                continue
            # Gradient methods hold every layer's activations for the backward: split the group so that
            # (prompts x points) per backward stays within the memory budget.
            rows = chunk or gradient_rows(engine, batch.n_pos)
            for first in range(0, batch.size, rows):
                part = inputs.select(list(range(first, min(first + rows, batch.size))))
                sums, full_sum = gradient_sums(engine, part, scorer, points, chunk=max(1, rows // part.batch.size),
                                               advance=lambda k, size=part.batch.size: advance(k * size))
                total += sums
                full += full_sum
    n = prepared.n_prompts
    return EdgeScoring(engine.graph, total / n, method, ablation, scorer.name, positions,
                       steps if method in STEP_METHODS else None, n, full / n)


# --- per token-length group ------------------------------------------------------------------------------

@dataclass
class BatchInputs:
    """What every method needs for one token-length group: tokens, the senders' ablated outputs, and the
    full model's clean logits when the metric compares against them."""

    batch: TaskBatch
    ablated: SenderOutputs
    reference: Float[torch.Tensor, "batch pos vocab"] | None

    @property
    def tokens(self) -> Int[torch.Tensor, "batch pos"]:
        return self.batch.clean

    @classmethod
    def build(cls, engine: MaskedEdgeEngine, batch: TaskBatch, ablation: str, scorer: DiscoveryMetric, *,
              seed: int = 0) -> BatchInputs:
        ablated = ablated_outputs(engine, ablation, batch.clean, corrupt=batch.corrupt if ablation == "corrupt" else None,
                                  reference=batch.clean, seed=seed)
        reference = None
        if scorer.needs_reference:
            with torch.no_grad():
                reference = engine.model.bridge(batch.clean, return_type="logits").detach()
        return cls(batch, ablated, reference)

    def select(self, rows: list[int]) -> BatchInputs:
        """The inputs of some prompts of the group (ablated outputs shared by the group stay shared)."""
        ablated = self.ablated if self.ablated.shape[1] == 1 else self.ablated[:, rows]
        reference = None if self.reference is None else self.reference[rows]
        return BatchInputs(self.batch.select(rows), ablated, reference)

    def repeated(self, k: int) -> tuple[TaskBatch, Float[torch.Tensor, "kbatch pos vocab"] | None]:
        """The batch (and reference) repeated k times along the batch, k blocks in order."""
        rows = list(range(self.batch.size)) * k
        return self.batch.select(rows), None if self.reference is None else self.reference.repeat(k, 1, 1)


# --- EAP and EAP-IG: receiver gradients, then one product -----------------------------------------------
# Every gradient method scores an edge s -> r as  (abl_s - clean_s) . (mean over its points of dm/d(input of r)):
# the difference is the same at every point, so the gradients are summed over the points first and the
# [senders x receivers] product is formed once.

Node = tuple[str, int]  # a layer-level node whose output EAP-IG-activations interpolates: input, attn l, mlp l
INPUT_NODE: Node = ("input", -1)


@dataclass(frozen=True)
class Point:
    """One point of a gradient method: `node`'s output set to  alpha clean + (1 - alpha) ablated  (the
    rest of the model runs on the clean prompt). alpha = 1 at the input is the clean run itself (EAP)."""

    node: Node
    alpha: float


CLEAN_POINT = Point(INPUT_NODE, 1.0)


def gradient_points(graph: Graph, method: str, steps: int) -> list[Point]:
    """EAP: the clean run. EAP-IG ("inputs"): the input embeddings at alpha = k / steps, k = 1..steps.
    EAP-IG-activations: every layer-level node (input, each attention layer, each MLP) in turn at those
    alphas, as in EAP-IG's reference implementation."""
    alphas = [k / steps for k in range(1, steps + 1)]
    if method == "eap":
        return [CLEAN_POINT]
    if method == "eap-ig":
        return [Point(INPUT_NODE, a) for a in alphas]
    nodes = [INPUT_NODE]
    for layer in range(graph.shape.n_layers):
        nodes += [("attn", layer)] + ([] if graph.shape.attn_only else [("mlp", layer)])
    return [Point(node, a) for node in nodes for a in alphas]


def gradient_sums(engine: MaskedEdgeEngine, inputs: BatchInputs, scorer: DiscoveryMetric, points: list[Point], *,
                  chunk: int | None = None, advance: Any = None) -> tuple[EdgeVector, float]:
    """Scores of a gradient method summed over the group's prompts, and the summed full-model metric.

    Per chunk of points: one forward of (points x prompts) rows with every receiver's input a tensor of its
    own (`_GradientRun`) and one backward give dm/d(input of r) for every receiver at once; they are
    summed over the points. The clean point's rows also give the senders' clean outputs. Then one matmul
    per receiver layer over the flattened (prompt, position, d_model) forms  (abl_s - clean_s) . mean grad
    for the senders that feed it (`edge_products`). This is the coefficient gradient of the masked engine
    at c = 1 (`MaskedEdgeEngine`: dm/dc = (out_s - abl_s) . dm/d(input of r)), without its per-edge
    product at every point."""
    if CLEAN_POINT not in points:
        raise DiscoveryError("gradient points must include the clean run (alpha = 1 at the input)")
    inputs, positions = at_read_positions(scorer, inputs)  # unembed only the positions the metric reads
    tokens, size = inputs.tokens, inputs.batch.size
    engine.model.check_tokens(tokens)
    per_forward = chunk or logit_rows_per_forward(engine, tokens)
    g = engine.graph
    grads = torch.zeros(g.n_receivers, *tokens.shape, engine.model.d_model)  # summed over the points
    clean: SenderOutputs | None = None
    full = math.nan
    for first in range(0, len(points), per_forward):
        part = points[first:first + per_forward]
        k = len(part)
        capture = part.index(CLEAN_POINT) if CLEAN_POINT in part else None
        run = _GradientRun(engine, inputs.ablated, part, size, capture)
        repeated_batch, reference = inputs.repeated(k)
        rows = None if positions is None else positions.repeat(k, 1)
        with torch.enable_grad():
            logits = engine.bridge.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=run.hooks(rows),
                                                  return_type="logits")
            values = scorer(logits, repeated_batch, reference)
            found = torch.autograd.grad(values.sum(), run.inputs, allow_unused=True, materialize_grads=True)
        first_receiver = 0
        for grad in found:  # [3 heads, k * batch, pos, d_model] or [k * batch, pos, d_model], in receiver order
            grad = grad.detach().reshape(-1, k, *grads.shape[1:])
            grads[first_receiver:first_receiver + grad.shape[0]] += grad.sum(1)
            first_receiver += grad.shape[0]
        if capture is not None:
            clean = run.sender_outputs()
            full = float(values.detach()[capture * size:(capture + 1) * size].sum())
        if advance is not None:
            advance(k)
    assert clean is not None
    return edge_products(g, inputs.ablated - clean, grads) / len(points), full


def edge_products(graph: Graph, difference: SenderOutputs,
                  grads: Float[torch.Tensor, "receiver batch pos d_model"]) -> EdgeVector:
    """difference_s . grads_r for every edge s -> r, in `graph.edges` order: a [senders x receivers] score
    matrix filled by one matmul per receiver layer (over the senders that can feed it), read at the edges."""
    n_senders, n_receivers = graph.n_senders, graph.n_receivers
    flat_diff = difference.expand(n_senders, *grads.shape[1:]).reshape(n_senders, -1)
    flat_grads = grads.reshape(n_receivers, -1)
    scores = torch.zeros(n_senders, n_receivers, dtype=flat_grads.dtype)
    for layer in range(graph.shape.n_layers):
        heads = graph.head_receivers(layer)
        stop = heads.stop if graph.shape.attn_only else graph.mlp_receiver(layer) + 1
        feeding = graph.senders_before(stop - 1)  # the MLP's senders include the layer's heads
        scores[:feeding, heads.start:stop] = flat_diff[:feeding] @ flat_grads[heads.start:stop].T
    scores[:, -1] = flat_diff @ flat_grads[-1]
    return scores[graph.edge_src, graph.edge_dst]


class _GradientRun:
    """The hooks of one gradient forward: k points x batch rows of the clean prompts, in which

    - every receiver's input is a tensor of its own (`inputs`, in receiver order): the per-head q/k/v
      streams of each layer (the residual expanded to 3 x heads, read by the per-head-input attention of
      graph/attention.py, as in the masked engine), the MLP's and the logits' input (a view of the
      residual), so one backward gives dm/d(input of r) for every receiver r;
    - the rows of a point set its node's output to  alpha clean + (1 - alpha) ablated, a constant: the
      input embeddings, an MLP's output, or an attention layer's heads (their output detached, the residual
      after them shifted by  (1 - alpha) sum_h (abl_h - out_h)  where the next readers see it);
    - the rows of point `capture` (the clean run) record every sender's output (`sender_outputs`).
    """

    def __init__(self, engine: MaskedEdgeEngine, ablated: SenderOutputs, points: list[Point], batch: int,
                 capture: int | None):
        self.engine, self.graph = engine, engine.graph
        self.ablated = ablated  # [sender, batch|1, pos, d_model]
        self.k, self.batch = len(points), batch
        # per interpolated node: its rows (indices into k * batch) and their weights 1 - alpha
        self.rows: dict[Node, tuple[torch.Tensor, Float[torch.Tensor, "rows 1 1"]]] = {}
        for node in dict.fromkeys(p.node for p in points):
            which = [i for i, p in enumerate(points) if p.node == node]
            index = (torch.tensor(which).unsqueeze(1) * batch + torch.arange(batch)).flatten()
            weight = torch.tensor([1.0 - points[i].alpha for i in which]).repeat_interleave(batch)
            self.rows[node] = (index, weight.view(-1, 1, 1))
        self.capture = None if capture is None else slice(capture * batch, (capture + 1) * batch)
        self.captured: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.shift: torch.Tensor | None = None  # an interpolated attention layer's shift, not yet applied
        self.resid: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def hooks(self, positions: Int[torch.Tensor, "rows n_read"] | None) -> FwdHooks:
        out: FwdHooks = []
        engine = self.engine
        for layer in range(self.graph.shape.n_layers):
            out.append((hook_name("resid_pre", layer), self._resid_pre(layer)))
            if engine.layers[layer].uses_hf_rotary:
                out.append((hook_name("rot_cos", layer), self._keep("cos")))
                out.append((hook_name("rot_sin", layer), self._keep("sin")))
            out.append((hook_name("pattern", layer), self._pattern))
            out.append((hook_name("z", layer), self._attention(layer)))
            if not self.graph.shape.attn_only:
                out.append((engine.mlp_in_hooks[layer], self._receiver_input(keep_shift=True)))
                out.append((hook_name("mlp_out", layer), self._mlp_out(layer)))
        out.append((engine.final_hook, self._receiver_input(keep_shift=False)))
        return out if positions is None else out + read_positions_hooks(positions)  # unembed only those

    def sender_outputs(self) -> Float[torch.Tensor, "sender batch pos d_model"]:
        """Every sender's output in the clean rows, in forward order."""
        return torch.cat(self.captured, dim=0)

    # --- helpers ---------------------------------------------------------------------------------------
    def _ablated_rows(self, senders: slice, index: torch.Tensor) -> torch.Tensor:
        """The ablated outputs of `senders` at rows `index` of the k * batch rows ([n, rows|1, pos, d])."""
        ablated = self.ablated[senders]
        return ablated if ablated.shape[1] == 1 else ablated[:, index % self.batch]

    def _set_output(self, node: Node, x: torch.Tensor, senders: slice) -> torch.Tensor:
        """x with the rows of `node`'s points replaced by the constant  alpha x + (1 - alpha) abl."""
        if node not in self.rows:
            return x
        index, weight = self.rows[node]
        fixed = x.detach()[index]
        fixed = fixed + weight * (self._ablated_rows(senders, index)[0] - fixed)
        return x.index_put((index,), fixed)

    def _record(self, outputs: torch.Tensor) -> None:
        if self.capture is not None:
            self.captured.append(outputs.detach()[:, self.capture])

    # --- hooks -----------------------------------------------------------------------------------------
    def _keep(self, attr: str) -> HookFn:
        def hook(x: torch.Tensor, hook: Any) -> None:
            setattr(self, attr, x)
        return hook

    def _pattern(self, x: torch.Tensor, hook: Any) -> None:
        self.visible = visible_keys(x)

    def _resid_pre(self, layer: int) -> HookFn:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            if layer == 0:
                x = self._set_output(INPUT_NODE, x, slice(0, 1))
                self._record(x.unsqueeze(0))
            elif self.shift is not None:  # the previous layer's interpolated attention (its MLP saw it too)
                x, self.shift = x + self.shift, None
            self.resid = x
            return x
        return hook

    def _attention(self, layer: int) -> HookFn:
        attention = self.engine.layers[layer]
        senders = self.graph.sender_block(layer)
        heads = slice(senders.start, senders.start + attention.n_heads)

        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            assert self.resid is not None
            if self.visible is None:
                raise DiscoveryError(f"layer {layer}: the bridge's attention fired no hook_pattern before hook_z")
            streams = self.resid.unsqueeze(0).expand(3 * attention.n_heads, *self.resid.shape)
            self.inputs.append(streams)  # q inputs of heads 0..H-1, then k, then v: the receiver order
            new_z = attention.z(streams, self.cos, self.sin, self.visible).to(z.dtype)
            self.visible = None
            if self.capture is not None:
                self.captured.append(attention.head_outputs(new_z.detach()[self.capture]))
            node = ("attn", layer)
            if node in self.rows:
                # The heads' output becomes a constant: no gradient into their inputs, and the residual after
                # them moves by (1 - alpha) (abl - out), summed over the heads.
                index, weight = self.rows[node]
                out = attention.head_outputs(new_z.detach()[index])
                moved = weight * (self._ablated_rows(heads, index) - out).sum(0)
                self.shift = torch.zeros_like(self.resid).index_put((index,), moved)
                new_z = new_z.index_put((index,), new_z.detach()[index])
            return new_z
        return hook

    def _receiver_input(self, *, keep_shift: bool) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            if self.shift is not None:
                x = x + self.shift
                if not keep_shift:
                    self.shift = None
            else:
                x = x.view_as(x)  # a tensor of its own: its gradient is this receiver's alone
            self.inputs.append(x)
            return x
        return hook

    def _mlp_out(self, layer: int) -> HookFn:
        sender = self.graph.sender_block(layer).stop - 1

        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            self._record(x.unsqueeze(0))
            return self._set_output(("mlp", layer), x, slice(sender, sender + 1))
        return hook


def exact_sums(engine: MaskedEdgeEngine, inputs: BatchInputs, scorer: DiscoveryMetric, *,
               edges: Int[torch.Tensor, " n"] | None = None, chunk: int | None = None,
               advance: Any = None) -> tuple[EdgeVector, float]:
    """Exact single-edge ablation effects summed over the group's prompts (NaN for edges not in `edges`),
    and the summed full-model metric.

    One recorded clean run; then the edges sorted by receiver layer (latest first), `chunk` per forward
    (one coefficient row each), each forward restarted at the layer of its earliest receiver. The full
    metric comes from the same engine (the all-kept run restarted at the logits), so the effects are
    differences of like computations."""
    graph = engine.graph
    chosen = torch.arange(graph.n_edges) if edges is None else edges
    per_forward = chunk or logit_rows_per_forward(engine, inputs.tokens)
    sums = torch.full((graph.n_edges,), math.nan)
    inputs, positions = at_read_positions(scorer, inputs)
    with torch.no_grad():
        record = engine.record(inputs.tokens)
        full_values = scorer(engine.run(inputs.tokens, torch.ones(graph.n_edges), inputs.ablated, record=record,
                                        positions=positions), inputs.batch, inputs.reference)
        full = float(full_values.sum())
        # Latest receiver layer first; a forward of `per_forward` edges restarts at its earliest edge's layer,
        # so a layer's last few edges share a forward with the next layer's first ones.
        order = torch.argsort(engine.edge_layer[chosen], descending=True, stable=True)
        ordered = chosen[order]
        for first in range(0, len(ordered), per_forward):
            ids = ordered[first:first + per_forward]
            k = len(ids)
            coefficients = torch.ones(k, graph.n_edges)
            coefficients[torch.arange(k), ids] = 0.0
            logits = engine.run(inputs.tokens, coefficients, inputs.ablated, record=record,
                                positions=positions)  # [k, B, P or 1, V]
            repeated_batch, reference = inputs.repeated(k)
            values = scorer(logits.reshape(-1, *logits.shape[2:]), repeated_batch, reference).view(k, -1)
            sums[ids] = values.sum(1) - full
            if advance is not None:
                advance(k)
    return sums, full


# Task metrics that read the logits at the answer position only (tasks/metrics.py); a task's own metric
# (induction_logprob, ...) may read others, so it gets every position.
ANSWER_POSITION_METRICS = ("logit_diff", "logprob", "prob", "kl")


def at_read_positions(scorer: DiscoveryMetric, inputs: BatchInputs,
                      ) -> tuple[BatchInputs, Int[torch.Tensor, "batch 1"] | None]:
    """When `scorer` reads only the answer position: the inputs re-indexed to that one position (answer_pos
    0, reference logits gathered there) and the positions for `MaskedEdgeEngine.run(positions=...)`, so
    restarted runs unembed one position per prompt. Otherwise (inputs, None)."""
    name = scorer.name
    answer_only = scorer.positions == "last" and (name in DISTANCE_METRICS or name in ANSWER_POSITION_METRICS
                                                  or name.startswith(OUTPUT_PREFIX))
    if not answer_only:
        return inputs, None
    positions = inputs.batch.answer_pos.unsqueeze(1)
    batch = replace(inputs.batch, answer_pos=torch.zeros_like(inputs.batch.answer_pos))
    reference = None
    if inputs.reference is not None:
        reference = inputs.reference[torch.arange(batch.size).unsqueeze(1), positions]
    return BatchInputs(batch, inputs.ablated, reference), positions


def gradient_rows(engine: MaskedEdgeEngine, n_pos: int, budget_bytes: float = 2**31) -> int:
    """Rows (prompts x interpolation points) per masked forward+backward within `budget_bytes`. Measured on
    SmolLM2: about 12 residual-sized float32 vectors per receiver and row are alive at the backward (the
    per-head streams, their norms and attention inputs, the receivers' gradients)."""
    per_row = 4 * n_pos * engine.model.d_model * 13 * engine.graph.n_receivers
    return max(1, int(budget_bytes // per_row))


def logit_rows_per_forward(engine: MaskedEdgeEngine, tokens: Int[torch.Tensor, "batch pos"],
                      budget_bytes: float = 2**28) -> int:
    """Coefficient rows (or interpolation points) per forward: logits of about `budget_bytes` float32."""
    per_row = tokens.numel() * engine.model.d_vocab * 4
    return max(1, int(budget_bytes // max(per_row, 1)))
