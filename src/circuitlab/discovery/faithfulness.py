"""How much of the model's behaviour a circuit keeps: normalised faithfulness, its curve, CPR and CMD.

A circuit C runs in the masked-edge engine with every edge outside it ablated. Its normalised faithfulness
(MIB, Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark") is

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

with m the mean metric over the task's prompts: 1 = the full model's behaviour, 0 = the behaviour with every
edge ablated. The same formula serves the distance metrics (kl, l2: m(full) = 0). The curve is f of the
top-n circuits over circuit sizes n (as fractions of the graph's edges, MIB's grid by default); with x the
fraction of edges, by the trapezoid rule from x = 0 (f = 0) to x = 1 (f = 1):

    CPR = integral of f(x) dx            (higher = a method finds faithful circuits sooner)
    CMD = integral of |1 - f(x)| dx      (lower = closer to the full model's behaviour)

See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float

from circuitlab.discovery.scores import BatchInputs, EdgeScoring, logit_rows_per_forward, scoring_setup
from circuitlab.discovery.selection import check_target, greedy_mask, nested_masks
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import CleanRun
from circuitlab.models.model import Model
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# MIB's circuit sizes, as fractions of the graph's edges.
MIB_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
Masks = Bool[torch.Tensor, "k edge"]
Read = Callable[[torch.Tensor, TaskBatch, torch.Tensor | None], torch.Tensor]


def undefined_reason(full: float, empty: float, metric: str) -> str | None:
    """Why faithfulness (m(C) - m(empty)) / (m(full) - m(empty)) is undefined, or None when it is defined:
    m(full) and m(empty) equal up to float32 rounding of the two runs (the ablated run reorders the same
    sums)."""
    if abs(full - empty) > 64 * torch.finfo(torch.float32).eps * max(abs(full), abs(empty)):
        return None
    return (f"faithfulness is undefined: the metric {metric!r} is {full:.6g} both with every edge and with none "
            "(the ablation does not change the behaviour); choose another ablation or metric")


class CircuitEvaluator:
    """The mean metric of many circuits on one task, several circuits per masked forward.

    Ablated outputs and reference logits are computed once per token-length group; m(full) and m(empty)
    come from the same engine, so f(full) = 1 and f(empty) = 0 exactly. check=False skips the test that
    faithfulness is defined (`undefined_reason`): a shard of a task's prompts may show no behaviour where
    the whole task does, so sharded verification and discovery test the merged values instead; m(full) and
    m(empty) then run only when first asked for.
    """

    def __init__(self, model: Model, task: Task | PreparedTask, *, ablation: str = "corrupt",
                 metric: str | None = None, positions: str = "last", graph: Graph | None = None, seed: int = 0,
                 rows_per_forward: int | None = None, check: bool = True):
        self.prepared, self.engine, self.scorer = scoring_setup(model, task, ablation=ablation, metric=metric,
                                                                positions=positions, graph=graph)
        self.graph = self.engine.graph
        self.inputs = [BatchInputs.build(self.engine, b, ablation, self.scorer, seed=seed) for b in self.prepared.batches]
        self.rows_per_forward = rows_per_forward
        self._records: dict[int, CleanRun] = {}  # per token-length group, the recorded run of one base mask
        self._records_of: bytes | None = None
        self.n_evaluated = 0  # circuits run so far (the cost of a search)
        self._ends: tuple[float, float] | None = None  # m(full), m(empty): run here when checked, else on first use
        if check and (reason := self.undefined()) is not None:
            raise DiscoveryError(reason)

    def undefined(self) -> str | None:
        """Why faithfulness is undefined on this task (m(full) = m(empty)), or None when it is defined."""
        return undefined_reason(self.full, self.empty, self.scorer.name)

    @property
    def full(self) -> float:
        """m(full): the mean metric with every edge kept."""
        return self._run_ends()[0]

    @property
    def empty(self) -> float:
        """m(empty): the mean metric with every edge ablated."""
        return self._run_ends()[1]

    def _run_ends(self) -> tuple[float, float]:
        # A prompt shard's evaluator (check=False) that only runs given masks never pays for these two rows.
        if self._ends is None:
            self.ends_per_prompt()
        assert self._ends is not None
        return self._ends

    def ends_per_prompt(self) -> Float[torch.Tensor, "2 prompt"]:
        """The full model's and the empty circuit's per-prompt metric (their means become m(full), m(empty),
        so a caller that needs the per-prompt values, as verification does, runs them once)."""
        ends = self.per_prompt(torch.stack([torch.ones(self.graph.n_edges, dtype=torch.bool),
                                            torch.zeros(self.graph.n_edges, dtype=torch.bool)]))
        means = ends.sum(1) / self.prepared.n_prompts
        self._ends = float(means[0]), float(means[1])
        return ends

    def metric(self, masks: Masks) -> Float[torch.Tensor, " k"]:
        """Mean metric over the task's prompts of each circuit (row of `masks`)."""
        return self.per_prompt(masks).sum(1) / self.prepared.n_prompts

    def per_prompt(self, masks: Masks, *, read: Read | None = None,
                   hooks: Callable[[BatchInputs, int], list[Any]] | None = None,
                   base: Bool[torch.Tensor, " edge"] | None = None) -> torch.Tensor:
        """Per-prompt values [k, n_prompts, *] of each circuit, in the task's example order.

        read(logits [k * batch, pos, vocab], batch, reference) -> [k * batch, *]: what to keep of each run
        (default: the metric). hooks(inputs, k) -> forward hooks added around each masked forward of k rows
        of that token-length group (e.g. noise on the input embeddings, as circuit verification does).
        base: a mask the rows equal on the edges into early layers (a circuit, when each row removes some of
        its nodes): its run is recorded once per token-length group and each forward restarts at the
        earliest layer where a row differs (same numbers up to float32 rounding). Ignored with `hooks`,
        which act from the embedding on.
        """
        masks = masks.reshape(-1, self.graph.n_edges)
        read = read or self.scorer
        order = None
        if base is not None and hooks is None:  # a forward restarts at its rows' earliest layer: group by it
            n_layers = self.graph.shape.n_layers
            layers = torch.where(masks != base, self.engine.edge_layer, n_layers).amin(1)
            order = torch.argsort(layers, descending=True, stable=True)
            masks = masks[order]
        out: torch.Tensor | None = None
        with torch.no_grad():
            for inputs in self.inputs:
                per_forward = self.rows_per_forward or logit_rows_per_forward(self.engine, inputs.tokens)
                record = None if base is None or hooks is not None else self._record(inputs, base)
                for first in range(0, masks.shape[0], per_forward):
                    rows = masks[first:first + per_forward].float()
                    k = rows.shape[0]
                    if hooks is None:
                        logits = self.engine.run(inputs.tokens, rows, inputs.ablated, record=record)  # [k, B, P, V]
                    else:
                        with self.engine.bridge.hooks(fwd_hooks=hooks(inputs, k)):
                            logits = self.engine.run(inputs.tokens, rows, inputs.ablated)
                    batch, reference = inputs.repeated(k)
                    values = read(logits.reshape(-1, *logits.shape[2:]), batch, reference)
                    values = values.reshape(k, inputs.batch.size, *values.shape[1:])
                    if out is None:
                        out = torch.zeros(masks.shape[0], self.prepared.n_prompts, *values.shape[2:],
                                          dtype=values.dtype)
                    out[first:first + k, inputs.batch.indices] = values
        self.n_evaluated += masks.shape[0]
        assert out is not None  # a prepared task has at least one batch
        return out if order is None else out[torch.argsort(order)]

    def faithfulness(self, masks: Masks) -> Float[torch.Tensor, " k"]:
        return (self.metric(masks) - self.empty) / (self.full - self.empty)

    def _record(self, inputs: BatchInputs, base: Bool[torch.Tensor, " edge"]) -> CleanRun:
        """The run of `base` on this group, recorded for restarts; kept for the last base only (a record holds
        every sender's output: memory for one base at a time)."""
        key = hashlib.sha1(base.numpy().tobytes()).digest()
        if self._records_of != key:
            self._records, self._records_of = {}, key
        if id(inputs) not in self._records:
            coefficients = None if bool(base.all()) else base.float()
            self._records[id(inputs)] = self.engine.record(inputs.tokens, coefficients,
                                                           None if coefficients is None else inputs.ablated)
        return self._records[id(inputs)]


@dataclass
class TaskMetric:
    """The mean metric of circuits over a whole task, wherever their masked runs happen: the curve, the
    selection and the bisection run on this, in one process and on prompt shards alike.

    evaluate(masks [k, edge]) -> mean metric [k] over the task's prompts (one process:
    `CircuitEvaluator.metric`; prompt shards: every shard's per-prompt values, summed over the whole task
    and divided by its prompt count). full, empty: m(full) and m(empty) of the same runs. name: the
    metric's name. model: given to the circuits found (optional).
    """

    graph: Graph
    evaluate: Callable[[Masks], Float[torch.Tensor, " k"]]
    full: float
    empty: float
    name: str
    model: Model | None = None

    @classmethod
    def of(cls, evaluator: CircuitEvaluator | TaskMetric) -> TaskMetric:
        if isinstance(evaluator, TaskMetric):
            return evaluator
        return cls(evaluator.graph, evaluator.metric, evaluator.full, evaluator.empty, evaluator.scorer.name,
                   evaluator.engine.model)

    def faithfulness(self, masks: Masks) -> Float[torch.Tensor, " k"]:
        return (self.evaluate(masks) - self.empty) / (self.full - self.empty)


def sizes_for(n_edges: int, fractions: tuple[float, ...] = MIB_FRACTIONS) -> list[int]:
    """Edge counts for the fractions (rounded, at least 1 for a positive fraction), sorted, distinct."""
    for x in fractions:
        if not 0 <= x <= 1:
            raise DiscoveryError(f"circuit-size fractions must lie in [0, 1], got {x!r}")
    return sorted({0 if x == 0 else max(1, round(x * n_edges)) for x in fractions} | {0, n_edges})


def area(x: list[float], y: list[float]) -> float:
    """Trapezoid-rule area under y(x) (x increasing)."""
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:], strict=False)))


@dataclass
class FaithfulnessCurve:
    """f over circuit sizes: sizes (edge counts), fractions of the graph, faithfulness and raw metric."""

    sizes: list[int]
    fractions: list[float]
    faithfulness: list[float]
    metrics: list[float]
    full: float
    empty: float
    metric: str
    greedy: bool = False

    @property
    def cpr(self) -> float:
        """Area under the curve (MIB's circuit performance ratio)."""
        return area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        """Area between the curve and 1 (MIB's circuit-model difference)."""
        return area(self.fractions, [abs(1 - f) for f in self.faithfulness])

    def records(self) -> list[dict[str, Any]]:
        return [{"n_edges": n, "fraction": x, "faithfulness": f, "metric": m}
                for n, x, f, m in zip(self.sizes, self.fractions, self.faithfulness, self.metrics, strict=True)]

    def summary(self) -> dict[str, Any]:
        return {"cpr": self.cpr, "cmd": self.cmd, "full_metric": self.full, "empty_metric": self.empty,
                "curve_points": len(self.sizes)}

    def figure(self, *, title: str | None = None, marker: tuple[int, float] | None = None) -> Figure:
        """f against the fraction of edges (log x axis, the empty circuit left out), with the 0 and 1 lines;
        `marker` = (n_edges, faithfulness) of the chosen circuit."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 3.6), dpi=150)
        ax = fig.add_subplot()
        points = [(x, f) for x, f in zip(self.fractions, self.faithfulness, strict=True) if x > 0]
        ax.plot([x for x, _ in points], [f for _, f in points], "o-", color="#1f77b4", label="top-n circuits")
        ax.axhline(1.0, color="#7f7f7f", lw=0.8, ls="--")
        ax.axhline(0.0, color="#7f7f7f", lw=0.8, ls=":")
        if marker is not None and marker[0] > 0:
            ax.plot([marker[0] / self.sizes[-1]], [marker[1]], "*", color="#d62728", ms=12, label="chosen circuit")
        ax.set_xscale("log")
        ax.set_xlabel("circuit size (fraction of edges)")
        ax.set_ylabel("normalised faithfulness")
        ax.set_title(title or f"faithfulness ({self.metric}): CPR {self.cpr:.3f}, CMD {self.cmd:.3f}", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        return fig


def curve_masks(graph: Graph, scores: EdgeScoring | torch.Tensor, *, fractions: tuple[float, ...] = MIB_FRACTIONS,
                greedy: bool = False, absolute: bool = True) -> Masks:
    """Which circuits a faithfulness curve runs: the top-n (greedy with `greedy`) at each size in `fractions`
    (plus 0 and 1), one row per size."""
    values = scores.scores if isinstance(scores, EdgeScoring) else scores
    return _masks(graph, values, sizes_for(graph.n_edges, fractions), greedy, absolute)


def finish_curve(masks: Masks, metrics: Float[torch.Tensor, " k"], full: float, empty: float, metric: str,
                 greedy: bool = False) -> FaithfulnessCurve:
    """The curve from the mean metric of each of `curve_masks` (m(full), m(empty) as measured with them)."""
    faithful = (metrics - empty) / (full - empty)
    # Greedy circuits are pruned and may be smaller than asked: plot them at their real size.
    real = [int(m.sum()) for m in masks]
    order = sorted(range(len(real)), key=lambda i: real[i])
    n_edges = masks.shape[1]
    return FaithfulnessCurve([real[i] for i in order], [real[i] / n_edges for i in order],
                             [float(faithful[i]) for i in order], [float(metrics[i]) for i in order],
                             full, empty, metric, greedy)


def _masks(graph: Graph, scores: torch.Tensor, sizes: list[int], greedy: bool, absolute: bool) -> Masks:
    if greedy:
        return torch.stack([greedy_mask(graph, scores, n, absolute=absolute) for n in sizes])
    return nested_masks(scores, sizes, absolute=absolute)


def faithfulness_curve(evaluator: CircuitEvaluator | TaskMetric, scores: EdgeScoring | torch.Tensor, *,
                       fractions: tuple[float, ...] = MIB_FRACTIONS, greedy: bool = False,
                       absolute: bool = True) -> FaithfulnessCurve:
    """f of the top-n circuits (greedy ones with `greedy`) at each size in `fractions` (plus 0 and 1)."""
    means = TaskMetric.of(evaluator)
    masks = curve_masks(means.graph, scores, fractions=fractions, greedy=greedy, absolute=absolute)
    return finish_curve(masks, means.evaluate(masks), means.full, means.empty, means.name, greedy)


def smallest_faithful_circuit(evaluator: CircuitEvaluator | TaskMetric, scores: EdgeScoring | torch.Tensor,
                              target: float, *, curve: FaithfulnessCurve | None = None, greedy: bool = False,
                              absolute: bool = True) -> tuple[Circuit, float]:
    """The smallest top-n circuit whose faithfulness reaches `target`, and its faithfulness.

    The curve's grid brackets the answer (the first grid size reaching the target and the one before it);
    bisection inside the bracket then assumes f grows with n there (it usually does, but f is not monotone
    in general, so "smallest" means smallest found by this search). Each step runs one circuit (`evaluate`
    of a `TaskMetric`: one more pass over the prompt shards in a sharded run).
    """
    check_target(target)
    means = TaskMetric.of(evaluator)
    values = scores.scores if isinstance(scores, EdgeScoring) else scores
    curve = curve or faithfulness_curve(means, values, greedy=greedy, absolute=absolute)
    reached = [i for i, f in enumerate(curve.faithfulness) if f >= target - _slack(target)]
    if not reached:  # unreachable only through rounding: the full circuit has f = 1 >= target
        raise DiscoveryError(f"no circuit reached faithfulness {target}")  # pragma: no cover
    hit = reached[0]
    low, high = (curve.sizes[hit - 1] if hit > 0 else 0), curve.sizes[hit]
    best = curve.faithfulness[hit]
    while high - low > 1:
        middle = (low + high) // 2
        f = float(means.faithfulness(_masks(means.graph, values, [middle], greedy, absolute))[0])
        if f >= target - _slack(target):
            high, best = middle, f
        else:
            low = middle
    mask = _masks(means.graph, values, [high], greedy, absolute)[0]
    return Circuit(means.graph, mask, values.detach().clone(), model=means.model), best


def _slack(target: float) -> float:
    """f = 1 for the full circuit holds to float32 rounding of the metric means; accept that much."""
    return 16 * torch.finfo(torch.float32).eps * max(1.0, abs(target))


def faithfulness_of(evaluator: CircuitEvaluator, circuit: Circuit) -> float:
    if not circuit.graph.shape.compatible_with(evaluator.graph.shape):
        raise DiscoveryError(f"circuit is for {circuit.graph.shape.describe()}, the model has "
                             f"{evaluator.graph.shape.describe()}")
    value = float(evaluator.faithfulness(circuit.in_graph.unsqueeze(0))[0])
    return value if math.isfinite(value) else math.nan
