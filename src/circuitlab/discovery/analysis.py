"""`discover/eap`, `discover/eap-ig`, `discover/eap-ig-act`, `discover/exact`: score every edge, choose a circuit, measure it.

One run: edge scores on the task (scores.py), the faithfulness curve of the top-n circuits over MIB's sizes
with CPR and CMD (faithfulness.py), and the circuit chosen by exactly one of ``top_n``, ``threshold`` or
``target_faithfulness`` (default: the smallest circuit reaching faithfulness 0.8). Outputs: circuit.json
(EAP-IG / MIB layout, every edge with its score and in_graph, node scores), circuit.png and circuit.dot
(the circuit picture), faithfulness.png, and one record per edge, strongest first. Scored with kl or l2, a
task needs no answers (`answers_optional`). See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.analysis import Analysis, ShardMap, ShardSpec
from circuitlab.discovery.faithfulness import (
    CircuitEvaluator,
    FaithfulnessCurve,
    TaskMetric,
    curve_masks,
    finish_curve,
    smallest_faithful_circuit,
    undefined_reason,
)
from circuitlab.discovery.head_map import HeadsParams, discover_heads
from circuitlab.discovery.metrics import DISTANCE_METRICS, check_metric_name
from circuitlab.discovery.param_grad import GradParams, discover_grad
from circuitlab.discovery.scores import STEP_METHODS, EdgeScoring, check_ablation, check_steps, edge_scores
from circuitlab.discovery.selection import check_target, check_threshold, check_top_n, select
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.mib_json import to_mib_dict
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.tasks.files import load_task_file
from circuitlab.tasks.source import TASK_FILE_SUFFIXES, TaskSource
from circuitlab.tasks.task import PreparedTask, Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_TARGET = 0.8


@dataclass(frozen=True)
class DiscoverParams:
    """ablation: corrupt | mean | zero | resample. score_metric: the task's metric when None, or kl / l2 /
    another task metric. positions: last | all. steps: EAP-IG interpolation points. Selection, at most one
    of: top_n (edges), threshold (|score| >= it), target_faithfulness (in (0, 1]); none = target 0.8.
    greedy: grow the top-n circuit from the logits (no dangling edges). curve: compute the faithfulness
    curve (needed by target_faithfulness)."""

    ablation: str = "corrupt"
    score_metric: str | None = None
    positions: str = "last"
    steps: int = 5
    top_n: int | None = None
    threshold: float | None = None
    target_faithfulness: float | None = None
    greedy: bool = False
    curve: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_metric_name(self.score_metric, self.positions)
        check_steps(self.steps)
        chosen = [name for name in ("top_n", "threshold", "target_faithfulness") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise DiscoveryError(f"choose one way to select the circuit, got {' and '.join(chosen)} "
                                 "(top-n, threshold and target faithfulness are mutually exclusive)")
        if self.top_n is not None:
            check_top_n(self.top_n)
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.target_faithfulness is not None:
            check_target(self.target_faithfulness)
        if self.greedy and self.threshold is not None:
            raise DiscoveryError("greedy selection grows a circuit to a size: use it with top-n or target faithfulness")
        if not self.curve and (self.target_faithfulness is not None or not chosen):
            raise DiscoveryError("target faithfulness needs the faithfulness curve; drop curve=False or give top-n")

    @property
    def selection(self) -> tuple[str, float]:
        if self.top_n is not None:
            return "top_n", self.top_n
        if self.threshold is not None:
            return "threshold", self.threshold
        return "target_faithfulness", self.target_faithfulness or DEFAULT_TARGET


@dataclass
class Discovery:
    """Edge scores, the chosen circuit, its faithfulness and the curve (None when not computed)."""

    scoring: EdgeScoring
    circuit: Circuit
    faithfulness: float
    curve: FaithfulnessCurve | None
    selection: tuple[str, float]
    greedy: bool = False

    def records(self) -> list[dict[str, Any]]:
        """One row per edge, strongest |score| first: edge, sender, receiver, qkv, score, in_graph, index."""
        rows = self.scoring.records()
        in_graph = self.circuit.in_graph.tolist()
        for e, row in enumerate(rows):
            row["in_graph"] = bool(in_graph[e])
            row["edge_index"] = e
        key = [-abs(s) if s == s else math.inf for s in self.scoring.scores.tolist()]
        return [rows[e] for e in sorted(range(len(rows)), key=key.__getitem__)]

    def summary(self) -> dict[str, Any]:
        stats = self.circuit.stats()
        mode, value = self.selection
        out: dict[str, Any] = {
            "method": self.scoring.method, "ablation": self.scoring.ablation, "metric": self.scoring.metric,
            "positions": self.scoring.positions, "selection": mode, "selection_value": value,
            "greedy": self.greedy, "circuit_edges": stats["n_edges"], "circuit_nodes": stats["n_nodes"],
            "circuit_heads": stats["n_heads"], "circuit_mlps": stats["n_mlps"],
            "edge_fraction": stats["edge_fraction"], "faithfulness": self.faithfulness,
            "graph_edges": self.scoring.graph.n_edges, "n_prompts": self.scoring.n_prompts,
            "full_metric": self.scoring.full_metric,
            "strongest_edges": [f"{edge} ({score:.4g})" for edge, score in self.scoring.top(5)],
        }
        if self.scoring.steps is not None:
            out["steps"] = self.scoring.steps
        if self.curve is not None:
            out.update({"cpr": self.curve.cpr, "cmd": self.curve.cmd, "empty_metric": self.curve.empty})
        return out

    def figures(self) -> dict[str, Figure]:
        from circuitlab.graph.draw import circuit_figure

        drawn, note = self._drawn()
        title = f"{self.scoring.method} circuit: {self.circuit.n_edges} edges, faithfulness {self.faithfulness:.3f}{note}"
        figures = {"circuit.png": circuit_figure(drawn, title=title)}
        if self.curve is not None:
            marker = (self.circuit.n_edges, self.faithfulness)
            figures["faithfulness.png"] = self.curve.figure(marker=marker)
        return figures

    def files(self) -> dict[str, str]:
        from circuitlab.graph.draw import circuit_dot

        drawn, _ = self._drawn()
        return {"circuit.json": self.circuit_json(), "circuit.dot": circuit_dot(drawn)}

    def circuit_json(self) -> str:
        """The EAP-IG / MIB layout: every edge with its score and in_graph, node scores (in + out |score|)."""
        scores = torch.nan_to_num(self.scoring.scores, nan=0.0)
        data = to_mib_dict(self.scoring.graph, self.circuit.in_graph, scores, self.scoring.node_scores())
        return json.dumps(data)

    def _drawn(self) -> tuple[Circuit, str]:
        """The strongest edges (|score|) when the circuit has too many to draw."""
        from circuitlab.graph.draw import drawn_subset

        return drawn_subset(self.circuit, self.scoring.scores.abs().nan_to_num(0.0))


def discover(model: Model, task: Task, method: str, params: DiscoverParams) -> Discovery:
    """Score, measure and select (see the module docstring)."""
    graph = Graph.from_model(model)
    if params.top_n is not None:
        check_top_n(params.top_n, graph)  # needs the model's graph size
    prepared = task.prepare(model)
    scoring = edge_scores(model, prepared, method=method, ablation=params.ablation, metric=params.score_metric,
                          positions=params.positions, steps=params.steps, graph=graph, seed=params.seed)
    return measure(model, prepared, scoring, params)


def measure(model: Model, prepared: PreparedTask, scoring: EdgeScoring, params: DiscoverParams) -> Discovery:
    """The faithfulness curve and the chosen circuit of these edge scores (the second half of `discover`),
    the masked runs in this process."""
    with status("measuring faithfulness"):
        evaluator = CircuitEvaluator(model, prepared, ablation=params.ablation, metric=params.score_metric,
                                     positions=params.positions, graph=scoring.graph, seed=params.seed)
        return measure_with(model, scoring, params, evaluator.metric, ends=(evaluator.full, evaluator.empty))


def measure_with(model: Model, scoring: EdgeScoring, params: DiscoverParams,
                 evaluate: Callable[[torch.Tensor], torch.Tensor], *,
                 ends: tuple[float, float] | None = None) -> Discovery:
    """The curve and the chosen circuit from `evaluate(masks [k, edge]) -> mean metric [k]` over the whole task,
    however the masked runs happen (one process: `CircuitEvaluator.metric`; prompt shards: `_shard`).

    Every circuit known from the scores alone runs in one call: the curve's sizes, the top-n or threshold
    circuit, and m(full), m(empty) unless `ends` gives them (two more rows). The target-faithfulness
    bisection then calls `evaluate` once per step.
    """
    graph = scoring.graph
    mode, value = params.selection
    none = torch.zeros(0, graph.n_edges, dtype=torch.bool)
    both_ends = torch.stack([torch.ones(graph.n_edges, dtype=torch.bool), torch.zeros(graph.n_edges, dtype=torch.bool)])
    curve_rows = curve_masks(graph, scoring, greedy=params.greedy) if params.curve else none
    chosen = None
    if mode != "target_faithfulness":
        chosen = select(graph, scoring.scores, top_n=params.top_n, threshold=params.threshold, greedy=params.greedy,
                        model=model)
    means = evaluate(torch.cat([both_ends if ends is None else none, curve_rows,
                                none if chosen is None else chosen.in_graph.unsqueeze(0)]))
    if ends is None:
        ends, means = (float(means[0]), float(means[1])), means[2:]
        if (reason := undefined_reason(*ends, scoring.metric)) is not None:
            raise DiscoveryError(reason)
    metric = TaskMetric(graph, evaluate, *ends, scoring.metric, model)
    curve = None
    if params.curve:
        curve = finish_curve(curve_rows, means[:len(curve_rows)], metric.full, metric.empty, metric.name,
                             params.greedy)
    if chosen is None:
        assert curve is not None  # DiscoverParams: target faithfulness needs the curve
        circuit, faithful = smallest_faithful_circuit(metric, scoring, float(value), curve=curve,
                                                      greedy=params.greedy)
    else:
        circuit = chosen
        faithful = float((means[-1] - metric.empty) / (metric.full - metric.empty))
        faithful = faithful if math.isfinite(faithful) else math.nan
    return Discovery(scoring, circuit, faithful, curve, (mode, value), params.greedy)


def answers_optional(source: TaskSource, params: Any) -> TaskSource:
    """kl and l2 compare the circuit with the full model, not with answers: then a task file (or a `Task`)
    may omit `answer` (params: any discovery params with a `score_metric`). The file is parsed here, before the model loads, as `TaskSource.validate` would."""
    if params.score_metric not in DISTANCE_METRICS:
        return source
    if source.task is not None:
        return replace(source, task=replace(source.task, require_answers=False))
    if source.name is not None and Path(source.name).suffix in TASK_FILE_SUFFIXES:
        task = load_task_file(source.name, metric=source.metric, require_answers=False)
        return TaskSource(n=source.n, seed=source.seed, metric=source.metric, task=task)
    return source


@dataclass
class ScoreSums:
    """A prompt shard's edge scores as sums over its prompts (`scores` and `full`), their count, the metric."""

    scores: torch.Tensor
    full: float
    n: int
    metric: str


def _shardable(params: DiscoverParams) -> None:
    if params.ablation in ("mean", "resample"):
        raise DiscoveryError(f"--ablation {params.ablation} draws from every prompt of a token-length group, so "
                             "prompt shards would change it: use corrupt or zero ablation with --backend ray / "
                             "--resume, or --backend local")


def _shard(method: str) -> ShardSpec[DiscoverParams]:
    """Edge scores are means over prompts: each shard returns its sums and count, and the driver adds them up.
    The circuits to measure follow from the merged scores, so their masked runs are further passes over the
    same shards (`_circuit_metrics`: each shard's per-prompt metric of each circuit), merged as sums over the
    whole task / its prompt count by `measure_with`, the code path of the one-process run."""
    def partial(model: Model, task: Task, params: DiscoverParams) -> ScoreSums:
        scoring = edge_scores(model, task.prepare(model), method=method, ablation=params.ablation,
                              metric=params.score_metric, positions=params.positions, steps=params.steps,
                              seed=params.seed)
        return ScoreSums(scoring.scores * scoring.n_prompts, scoring.full_metric * scoring.n_prompts,
                         scoring.n_prompts, scoring.metric)

    def scoring_of(model: Model, partials: list[ScoreSums], params: DiscoverParams) -> EdgeScoring:
        graph = Graph.from_model(model)
        if params.top_n is not None:
            check_top_n(params.top_n, graph)
        n = sum(p.n for p in partials)
        scores = partials[0].scores
        for p in partials[1:]:
            scores = scores + p.scores
        return EdgeScoring(graph, scores / n, method, params.ablation, partials[0].metric,
                           params.positions, params.steps if method in STEP_METHODS else None, n,
                           sum(p.full for p in partials) / n)

    def merge_with_shards(model: Model, task: Task, partials: list[ScoreSums], params: DiscoverParams,
                          shard_map: ShardMap) -> Discovery:
        scoring = scoring_of(model, partials, params)

        def evaluate(masks: torch.Tensor) -> torch.Tensor:
            # the module attribute, looked up per call: workers import the pass function by its name
            per_prompt = torch.cat(shard_map(_circuit_metrics, masks), dim=1)  # [k, prompts] in task order
            return per_prompt.sum(1) / scoring.n_prompts

        return measure_with(model, scoring, params, evaluate)

    return ShardSpec(partial, None, _shardable, merge_with_shards)


def _circuit_metrics(model: Model, shard: Task, params: DiscoverParams, masks: torch.Tensor) -> torch.Tensor:
    """A pass over one prompt shard: the metric of each circuit (row of `masks`) on each of its prompts,
    [k, shard prompts]. check=False: whether faithfulness is defined is decided on the whole task."""
    evaluator = CircuitEvaluator(model, shard.prepare(model), ablation=params.ablation, metric=params.score_metric,
                                 positions=params.positions, seed=params.seed, check=False)
    return evaluator.per_prompt(masks)


def _entry(method: str, description: str) -> Analysis[DiscoverParams]:
    def compute(model: Model, task: Task | None, params: DiscoverParams) -> Discovery:
        assert task is not None  # the entry requires a task
        return discover(model, task, method, params)

    return Analysis(f"discover/{method}", description, DiscoverParams, compute, task_source=answers_optional,
                    shard=_shard(method))


EAP = _entry("eap", "circuit discovery by edge attribution patching (first-order edge effects)")
EAP_IG = _entry("eap-ig", "circuit discovery by EAP with integrated gradients on the input embeddings")
EAP_IG_ACT = _entry("eap-ig-act", "circuit discovery by EAP with integrated gradients on each layer's activations "
                    "(MIB's EAP-IG-activations)")
EXACT = _entry("exact", "circuit discovery by exact single-edge ablation effects (masked runs)")
# Node-level methods (issue 13): algorithms, params and the `NodeDiscovery` result in param_grad.py / head_map.py.
GRAD = Analysis("discover/grad", "node importance from one backward: |grad| and |grad x weight| of the task metric "
                "per head and MLP; the flagged (or top-n) nodes as a circuit", GradParams, discover_grad)
HEADS = Analysis("discover/heads", "head-level causal map: every head's hook_z patched (noising) by the "
                 "activation-patching engine; the strongest heads (with every MLP) as a circuit", HeadsParams,
                 discover_heads)
