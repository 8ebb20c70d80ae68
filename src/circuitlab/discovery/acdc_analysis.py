"""`discover/acdc`: ACDC's circuit (discovery/acdc.py) with the outputs of every discovery method.

circuit.json (EAP-IG / MIB layout; an edge's score is its metric change when ACDC tested it, 0 for edges
never tested), circuit.png and circuit.dot, acdc_log.json (per receiver: edges tested, removed, forwards,
seconds), one record per edge (with `tested`), and a summary with the circuit's normalised faithfulness
(CircuitEvaluator), tau and the cost (circuits evaluated, masked forwards). ACDC keeps one circuit, so
there is no faithfulness curve. See docs/METHODS.md, "ACDC".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.analysis import Analysis
from circuitlab.discovery.acdc import DEFAULT_TAU, ACDCRun, acdc, check_level, check_tau
from circuitlab.discovery.analysis import Discovery, answers_optional
from circuitlab.discovery.faithfulness import CircuitEvaluator, faithfulness_of
from circuitlab.discovery.metrics import check_metric_name
from circuitlab.discovery.scores import EdgeScoring, check_ablation
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class ACDCParams:
    """ablation: corrupt | mean | zero | resample. score_metric: kl (default), l2 or a task metric.
    positions: last | all. tau: remove an edge whose removal moves the metric by less than tau (>= 0).
    level: edge (q, k and v inputs apart) or head (a head's three inputs as one receiver)."""

    ablation: str = "corrupt"
    score_metric: str | None = "kl"
    positions: str = "last"
    tau: float = DEFAULT_TAU
    level: str = "edge"
    seed: int = 0

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_metric_name(self.score_metric, self.positions)
        check_tau(self.tau)
        check_level(self.level)


@dataclass
class ACDCDiscovery:
    """ACDC's run and its circuit's faithfulness, shown as a `Discovery` (same files and figures)."""

    run: ACDCRun
    discovery: Discovery

    def records(self) -> list[dict[str, Any]]:
        """One row per edge as the other methods (strongest |score| first), plus whether ACDC tested it."""
        tested = self.run.tested.tolist()
        rows = self.discovery.records()
        for row in rows:
            row["tested"] = bool(tested[row["edge_index"]])
        return rows

    def summary(self) -> dict[str, Any]:
        run = self.run
        out = self.discovery.summary()
        for key in ("selection", "selection_value", "greedy"):
            out.pop(key, None)
        skipped = sum(step.skipped for step in run.steps)
        out.update({"tau": run.tau, "level": run.level, "final_metric": run.final_metric, "edges_tested": int(run.tested.sum()),
                    "edges_removed": run.graph.n_edges - run.n_edges, "receivers_visited": len(run.steps) - skipped,
                    "receivers_skipped": skipped, "circuits_evaluated": run.n_circuits, "forwards": run.n_forwards})
        return out

    def figures(self) -> dict[str, Figure]:
        return self.discovery.figures()

    def files(self) -> dict[str, str]:
        return {**self.discovery.files(), "acdc_log.json": json.dumps(self.run.log(), indent=1)}


def discover_acdc(model: Model, task: Task, params: ACDCParams) -> ACDCDiscovery:
    """ACDC on `task`, then the faithfulness of its circuit (NaN when the ablation leaves the metric
    unchanged, so faithfulness is undefined)."""
    prepared = task.prepare(model)
    run = acdc(model, prepared, tau=params.tau, ablation=params.ablation, metric=params.score_metric,
               positions=params.positions, seed=params.seed, level=params.level)
    circuit = run.circuit(model)
    with status("measuring faithfulness"):
        evaluator = CircuitEvaluator(model, prepared, ablation=params.ablation, metric=params.score_metric,
                                     positions=params.positions, graph=run.graph, seed=params.seed, check=False)
        faithful = math.nan if evaluator.undefined() is not None else faithfulness_of(evaluator, circuit)
    scoring = EdgeScoring(run.graph, torch.nan_to_num(run.scores, nan=0.0), "acdc", run.ablation, run.metric,
                          run.positions, n_prompts=run.n_prompts, full_metric=run.full_metric)
    return ACDCDiscovery(run, Discovery(scoring, circuit, faithful, None, ("tau", run.tau)))


def _compute(model: Model, task: Task | None, params: ACDCParams) -> ACDCDiscovery:
    assert task is not None  # the entry requires a task
    return discover_acdc(model, task, params)


ACDC = Analysis("discover/acdc", "circuit discovery by ACDC (greedy edge removal from the logits backwards, "
                "Conmy et al. 2023)", ACDCParams, _compute, task_source=answers_optional)
