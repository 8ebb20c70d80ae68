"""Edge scores: how much the metric changes when one edge of the graph is ablated.

For an edge s -> r the score is  m(edge ablated) - m(full model),  averaged over the task's prompts, where
"ablated" replaces the sender's contribution to that receiver's input by its ablated output (corrupt prompt,
mean, zero or resample; see graph/ablation.py). Three ways to get it:

- **EAP** (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery"), first order::

      score(s -> r) ~ (abl_s - out_s) . dm/d(input of r)

  In the masked-edge engine a receiver's input is  sum_s c_sr out_s + (1 - c_sr) abl_s,  so the derivative
  of m with respect to the coefficient c_sr at c = 1 is  (out_s - abl_s) . dm/d(input of r)  and the EAP
  score is minus that gradient: one ablated forward (for abl_s), one masked forward with gradient and one
  backward give every edge of the graph at once.
- **EAP-IG** (Hanna et al. 2024, "Have Faith in Faithfulness"), the "inputs" variant: the gradient is
  averaged over `steps` points on the straight line from the ablated to the clean input embeddings,
  alpha = k / steps for k = 1..steps, and multiplied by the fixed difference (abl_s - clean out_s). With
  steps = 1 the only point is the clean input, which is EAP.
- **exact**: the masked run with that one edge's coefficient set to 0, many edges per forward (one
  coefficient row each). No approximation: the reference the other two are scored against on small
  graphs. Edges are grouped by their receiver's layer r and each group's runs restart at layer r from
  one recorded clean run (`MaskedEdgeEngine.record`): nothing before r can change, so only blocks
  r..L-1 run (edges into the logits: only the final norm and unembedding).

See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

import math
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
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.metrics import OUTPUT_PREFIX, needs_answers
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("eap", "eap-ig", "exact")
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


# --- the verb ------------------------------------------------------------------------------------------

def edge_scores(model: Model, task: Task | PreparedTask, *, method: str = "eap-ig", ablation: str = "corrupt",
                metric: str | None = None, positions: str = "last", steps: int = 5, graph: Graph | None = None,
                seed: int = 0, chunk: int | None = None) -> EdgeScoring:
    """Score every edge of the model's graph on `task` (every token-length group, weighted by its size).

    method: "eap" | "eap-ig" | "exact"; ablation: "corrupt" | "mean" | "zero" | "resample" (mean and
    resample draw from the group's clean prompts); metric: the task's own by default, or "kl" / "l2";
    positions: "last" (answer position) or "all"; steps: EAP-IG interpolation points; chunk: rows per
    forward pass: prompts x interpolation points (EAP, EAP-IG; default: about 2 GiB of activations for the
    backward) or edges (exact; default: about 256 MB of logits).
    """
    check_method(method)
    check_ablation(ablation)
    check_metric_name(metric, positions)
    check_steps(steps)
    prepared = task if isinstance(task, PreparedTask) else task.prepare(model)
    engine = MaskedEdgeEngine(model, graph)
    scorer = discovery_metric(prepared, metric, positions)
    if not scorer.needs_reference and needs_answers(scorer.name) and not prepared.task.has_answers:
        raise DiscoveryError(f"task {prepared.task.name!r} has examples without an answer, which the metric "
                             f"{scorer.name!r} scores; give every example an answer, or score with kl or l2")
    total = torch.zeros(engine.graph.n_edges)
    full = 0.0
    per_prompt = {"exact": engine.graph.n_edges, "eap-ig": steps, "eap": 1}[method]
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
            # (prompts x interpolation points) per backward stays within the memory budget.
            rows = chunk or gradient_rows(engine, batch.n_pos)
            for first in range(0, batch.size, rows):
                part = inputs.select(list(range(first, min(first + rows, batch.size))))
                if method == "eap":
                    sums, full_sum = eap_sums(engine, part, scorer)
                    advance(part.batch.size)
                else:
                    points = max(1, rows // part.batch.size)
                    sums, full_sum = eap_ig_sums(engine, part, scorer, steps, chunk=points,
                                                 advance=lambda k, size=part.batch.size: advance(k * size))
                total += sums
                full += full_sum
    n = prepared.n_prompts
    return EdgeScoring(engine.graph, total / n, method, ablation, scorer.name, positions,
                       steps if method == "eap-ig" else None, n, full / n)


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


def _grad_coefficients(engine: MaskedEdgeEngine) -> torch.Tensor:
    """Every edge kept (c = 1), differentiable: the engine's backward keeps the (1 - c) terms its forward
    skips, so dm/dc is exact there."""
    return torch.ones(engine.graph.n_edges, requires_grad=True)


def eap_sums(engine: MaskedEdgeEngine, inputs: BatchInputs, scorer: DiscoveryMetric) -> tuple[EdgeVector, float]:
    """EAP scores summed over the group's prompts, and the summed full-model metric."""
    coefficients = _grad_coefficients(engine)
    inputs, positions = at_read_positions(scorer, inputs)  # unembed only the positions the metric reads
    with torch.enable_grad():
        logits = engine.run(inputs.tokens, coefficients, inputs.ablated, positions=positions)
        values = scorer(logits, inputs.batch, inputs.reference)
        (grad,) = torch.autograd.grad(values.sum(), coefficients)
    return -grad.detach(), float(values.detach().sum())


def eap_ig_sums(engine: MaskedEdgeEngine, inputs: BatchInputs, scorer: DiscoveryMetric, steps: int, *,
                chunk: int | None = None, advance: Any = None) -> tuple[EdgeVector, float]:
    """EAP-IG ("inputs") scores summed over the group's prompts, and the summed full-model metric.

    Per chunk of interpolation points: one plain forward with the interpolated input embeddings gives the
    senders' outputs out_s(alpha) there; the masked run then uses  abl'_s = out_s(alpha) - (clean_s - abl_s)
    as ablated outputs, so that the coefficient gradient is  (clean_s - abl_s) . dm/d(input of r) at alpha,
    EAP-IG's product, with every edge at once.
    """
    inputs, positions = at_read_positions(scorer, inputs)  # unembed only the positions the metric reads
    batch, tokens = inputs.batch, inputs.tokens
    size = batch.size
    clean_out = engine.sender_outputs(tokens)
    difference = clean_out - inputs.ablated  # [S, B, P, d]: clean_s - abl_s
    start = inputs.ablated[0].expand_as(clean_out[0])  # the ablated input embeddings
    alphas = torch.arange(1, steps + 1, dtype=clean_out.dtype) / steps
    per_forward = chunk or logit_rows_per_forward(engine, tokens)
    total = torch.zeros(engine.graph.n_edges)
    full = math.nan
    resid0 = hook_name("resid_pre", 0)
    for first in range(0, steps, per_forward):
        points = alphas[first:first + per_forward]
        k = len(points)
        embedded = (start.unsqueeze(0) + points.view(k, 1, 1, 1) * (clean_out[0] - start).unsqueeze(0))
        embedded = embedded.reshape(k * size, *start.shape[1:])

        def interpolate(x: torch.Tensor, hook: Any, embedded: torch.Tensor = embedded) -> torch.Tensor:
            return embedded.to(x.dtype)

        repeated_tokens = tokens.repeat(k, 1)
        repeated_batch, reference = inputs.repeated(k)
        with engine.bridge.hooks(fwd_hooks=[(resid0, interpolate)]):
            at_alpha = engine.sender_outputs(repeated_tokens)
            ablated = at_alpha - difference.repeat(1, k, 1, 1)
            coefficients = _grad_coefficients(engine)
            with torch.enable_grad():
                logits = engine.run(repeated_tokens, coefficients, ablated,
                                    positions=None if positions is None else positions.repeat(k, 1))
                values = scorer(logits, repeated_batch, reference)
                (grad,) = torch.autograd.grad(values.sum(), coefficients)
        total -= grad.detach()
        if float(points[-1]) == 1.0:  # the clean end: the full model's metric
            full = float(values.detach()[-size:].sum())
        if advance is not None:
            advance(k)
    return total / steps, full


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
    per-head streams, their norms and attention inputs, the senders' differences)."""
    per_row = 4 * n_pos * engine.model.d_model * 13 * engine.graph.n_receivers
    return max(1, int(budget_bytes // per_row))


def logit_rows_per_forward(engine: MaskedEdgeEngine, tokens: Int[torch.Tensor, "batch pos"],
                      budget_bytes: float = 2**28) -> int:
    """Coefficient rows (or interpolation points) per forward: logits of about `budget_bytes` float32."""
    per_row = tokens.numel() * engine.model.d_vocab * 4
    return max(1, int(budget_bytes // max(per_row, 1)))
