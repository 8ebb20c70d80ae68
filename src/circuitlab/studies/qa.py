"""`study/qa`: which attention heads copy the answer out of a document, and how much of the behaviour the
circuit of those heads keeps.

On the `qa` task ("Document: Alice works at Google in London. Question: Which company does Alice work for?
Answer:" -> " Google"; corrupt: the answer entity in the document replaced, metric logit_diff):

1. **Head map**: every head patched alone from the corrupt run into the clean one through its output
   (discovery/head_map.py `head_map`, activation patching of hook_z, noising); a head's *effect* is the
   share of the clean-vs-corrupt logit difference lost when that head alone is corrupted.
2. **Top-k heads**: the `top_k` heads of largest |effect|.
3. **Circuit**: the node-level circuit of those heads (discovery/head_map.py's convention: the kept heads
   and every MLP, with every edge among them, from the input and into the logits; the map scores heads
   only, so the MLPs stay).
4. **Faithfulness** under corrupt ablation with bootstrap 95% intervals over prompts (verify/measures.py
   `Verifier`) of the circuits of the top 1, 2, ..., k heads, and of the MLPs-only circuit (no head at all):
   what the heads add.

See docs/METHODS.md, "Case studies" (Document QA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.analysis import Analysis
from circuitlab.discovery.head_map import every_mlp, head_map, head_map_discovery, select_heads
from circuitlab.discovery.nodes import NodeDiscovery, node_curve, node_mask
from circuitlab.errors import AnalysisError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.tasks.task import Task
from circuitlab.verify.bootstrap import Interval
from circuitlab.verify.measures import Verifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class QAStudyParams:
    """top_k: heads kept (largest |effect| in the head map). n_bootstrap: resamples per interval.
    curve: also draw the faithfulness curve over the number of ranked heads. seed: bootstrap."""

    top_k: int = 5
    n_bootstrap: int = 1000
    curve: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class QAStudy:
    """The head map and circuit (a `NodeDiscovery`) and the verified faithfulness of growing circuits."""

    model_spec: str
    discovery: NodeDiscovery
    top_k: int
    growing: list[Interval]  # faithfulness of the circuits of the top 0, 1, ..., k heads (+ every MLP)
    n_prompts: int

    @property
    def faithfulness(self) -> Interval:
        return self.growing[-1]

    @property
    def mlps_only(self) -> Interval:
        return self.growing[0]

    def records(self) -> list[dict[str, Any]]:
        """One row per head, strongest first: its effect, rank, and (top k) the faithfulness of the circuit
        of the heads up to it."""
        rows = []
        for row in self.discovery.records():
            top = row["rank"] + 1  # records rank from 0
            extra = self.growing[top].as_dict("faithfulness_up_to") if top < len(self.growing) else {}
            rows.append({**row, **extra})
        return rows

    def summary(self) -> dict[str, Any]:
        scores = self.discovery.node_scores
        stats = self.discovery.circuit.stats()
        info = self.discovery.info
        return {
            "n_prompts": self.n_prompts, "metric": info.get("metric"), "clean_metric": info.get("clean_mean"),
            "corrupt_metric": info.get("corrupt_mean"),
            "top_heads": [f"{h} (effect {scores[h]:.3f})" for h in self.discovery.kept],
            "circuit_edges": stats["n_edges"], "circuit_heads": stats["n_heads"], "circuit_mlps": stats["n_mlps"],
            "edge_fraction": stats["edge_fraction"], **self.faithfulness.as_dict("faithfulness"),
            **self.mlps_only.as_dict("mlps_only_faithfulness"),
        }

    def figures(self) -> dict[str, Figure]:
        return self.discovery.figures()  # circuit.png, faithfulness.png (curve), the head-map heatmap

    def files(self) -> dict[str, str]:
        return {**self.discovery.files(), "findings.md": self.findings()}

    def findings(self) -> str:
        info, scores = self.discovery.info, self.discovery.node_scores
        stats = self.discovery.circuit.stats()
        lines = [
            f"# Document QA case study: {self.model_spec}", "",
            f"Numbers from this run only: {self.n_prompts} prompts; metric {info.get('metric')} (clean "
            f"{info.get('clean_mean', float('nan')):.3f}, corrupt {info.get('corrupt_mean', float('nan')):.3f}); 95% "
            "intervals are percentile bootstraps over prompts.", "",
            "## Heads", "",
            "Each head patched alone from the corrupt run (answer entity replaced in the document); its effect is "
            "the share of the clean-vs-corrupt difference lost.", "",
            "| rank | head | effect | faithfulness of the top heads up to here (+ every MLP) |", "|---|---|---|---|",
        ]
        for rank, head in enumerate(self.discovery.kept, 1):
            lines.append(f"| {rank} | {head} | {scores[head]:+.3f} | {self.growing[rank]} |")
        lines += ["", "## Circuit", "",
                  f"The top {len(self.discovery.kept)} heads and every MLP ({stats['n_mlps']}), with every edge among "
                  f"them: {stats['n_edges']} edges ({stats['edge_fraction']:.1%} of the graph). Faithfulness under "
                  f"corrupt ablation: {self.faithfulness}; the MLPs alone (no head): {self.mlps_only}."]
        return "\n".join(lines) + "\n"


def qa_study(model: Model, task: Task, params: QAStudyParams) -> QAStudy:
    """Head map, top-k heads, their node circuit and its verified faithfulness (module docstring)."""
    n_heads = model.n_layers * model.n_heads
    if params.top_k > n_heads:
        raise AnalysisError(f"top_k {params.top_k} is more than the model's {n_heads} heads")
    prepared = task.prepare(model)
    hmap = head_map(model, prepared)
    kept = select_heads(hmap, top_n=params.top_k)
    graph = Graph.from_model(model)
    mlps = every_mlp(graph)
    circuit = Circuit(graph, node_mask(graph, [*mlps, *kept]), model=model)
    with status("verifying the circuits of the top heads"):
        # one evaluator (corrupt ablation, the head map's) for the intervals and the curve
        verifier = Verifier(model, prepared, circuit.graph, seed=params.seed, n_bootstrap=params.n_bootstrap)
        masks = torch.stack([node_mask(graph, [*mlps, *kept[:k]]) for k in range(len(kept) + 1)])
        intervals = verifier.faithfulness(masks)
        ranked = [hmap.nodes[i] for i in hmap.ranked()]
        curve = node_curve(verifier.evaluator, ranked, mlps) if params.curve else None
    discovery = head_map_discovery(hmap, prepared, circuit, kept, intervals[-1].value, curve,
                                   ("top_n", params.top_k), "corrupt", len(mlps))
    return QAStudy(model.spec, discovery, params.top_k, intervals, prepared.n_prompts)


def _compute(model: Model, task: Task | None, params: QAStudyParams) -> QAStudy:
    assert task is not None  # the entry requires a task
    return qa_study(model, task, params)


QA: Analysis[QAStudyParams] = Analysis(
    "study/qa", "Document QA case study: the top-k heads by per-head patching, their node circuit and its "
    "faithfulness with bootstrap intervals", QAStudyParams, _compute,
)
