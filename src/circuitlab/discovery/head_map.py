"""Head-level causal map (``discover/heads``): every attention head patched alone, as node-level discovery.

The activation-patching engine (`circuitlab.patching.ActivationPatcher`) patches each (layer, head) through
``hook_z`` (the head's output before W_O) in the *noising* direction: the clean run with that one head
carrying its value from the corrupt prompt. Patching reports the normalised metric

    value = (m(patched) - m(corrupt)) / (m(clean) - m(corrupt))      (1 = clean, 0 = corrupt)

and a head's score is its **effect** = 1 - value: the share of the clean-vs-corrupt behaviour lost when that
head alone is corrupted. Noising matches the circuits' corrupt ablation (a head outside the circuit carries
its corrupt value) and finds every head an AND-mechanism needs (the induction head and the previous-token
head each destroy it alone, while denoising either one alone restores nothing).

Heads are kept by top_n (the n largest |effect|), threshold (|effect| >= it) or, by default, |effect| >=
DEFAULT_FRACTION of the largest |effect|. The circuit holds the kept heads *and every MLP* (the map scores
heads only; dropping the MLPs too would measure the MLPs' removal, not the choice of heads), with every
edge among them, from the input and to the logits; its faithfulness comes from `CircuitEvaluator` (corrupt
ablation, the same metric). Only corrupt ablation exists: the patching engine swaps clean and corrupt
activations. See docs/METHODS.md, "Head-level causal map".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from circuitlab.discovery.faithfulness import FaithfulnessCurve
from circuitlab.discovery.metrics import check_metric_name
from circuitlab.discovery.nodes import NodeDiscovery, measure_nodes
from circuitlab.discovery.selection import check_threshold, check_top_n
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.naming import head_name, mlp_name
from circuitlab.models.model import Model
from circuitlab.patching import ActivationPatcher, PatchingResult
from circuitlab.patching.plots import patching_figures
from circuitlab.tasks.task import PreparedTask, Task

if TYPE_CHECKING:
    from circuitlab.patching.grid import Cell

# Default selection: heads whose |effect| reaches this fraction of the largest one. On the hand-set
# induction model the two true heads have effects near 1 and every other head exactly 0, so any fraction
# in (0, 1) recovers them; 0.2 keeps the heads within a factor 5 of the strongest.
DEFAULT_FRACTION = 0.2


def check_heads_metric(metric: str | None) -> str | None:
    """A task metric (kl here is the task's KL to the clean run); l2 is not one the patching engine has."""
    if metric == "l2":
        raise DiscoveryError("--metric l2 does not apply to --method heads: the patching engine scores task metrics "
                             "(logit_diff, logprob, prob, kl, ...); use kl to compare with the full model")
    return check_metric_name(metric)


def check_heads_ablation(ablation: str) -> str:
    if ablation != "corrupt":
        raise DiscoveryError(f"--ablation {ablation} does not apply to --method heads: activation patching swaps "
                             "activations between the clean and the corrupt prompts, so only 'corrupt' exists")
    return ablation


@dataclass
class HeadMap:
    """The noising sweep of hook_z by (layer, head) and each head's effect (1 - normalised value)."""

    sweep: PatchingResult

    @property
    def effects(self) -> Float[torch.Tensor, " cell"]:
        return 1.0 - self.sweep.normalised()

    @property
    def nodes(self) -> list[str]:
        return [head_name(c.layer, _head(c)) for c in self.sweep.cells]

    def ranked(self) -> list[int]:
        """Cell indices by |effect|, largest first (ties: graph order)."""
        return torch.argsort(self.effects.abs(), descending=True, stable=True).tolist()

    def records(self) -> list[dict[str, Any]]:
        value, mean, effect = self.sweep.normalised(), self.sweep.mean(), self.effects
        return [{"node": self.nodes[i], "layer": self.sweep.cells[i].layer, "head": self.sweep.cells[i].head,
                 "effect": float(effect[i]), "value": float(value[i]), "metric": float(mean[i]), "rank": rank}
                for rank, i in enumerate(self.ranked())]


def head_map(model: Model, task: Task | PreparedTask, *, max_batch: int = 256) -> HeadMap:
    """Patch every head's hook_z from the corrupt run into the clean one (`circuitlab patch --site z --by
    layer,head --direction noise`)."""
    prepared = task if isinstance(task, PreparedTask) else task.prepare(model)
    return HeadMap(ActivationPatcher(model, prepared, max_batch=max_batch).sweep("z", ("layer", "head"), "noise"))


def _head(cell: Cell) -> int:
    """The head of a cell of the (layer, head) sweep, where every cell names one."""
    if cell.head is None:
        raise DiscoveryError(f"the head map needs a sweep by (layer, head); cell {cell} patches every head")
    return cell.head


def select_heads(hmap: HeadMap, *, top_n: int | None = None, threshold: float | None = None) -> list[str]:
    """Kept heads, strongest first: top_n, or |effect| >= threshold, or >= DEFAULT_FRACTION of the max."""
    order = hmap.ranked()
    effect = hmap.effects.abs()
    if top_n is not None:
        if top_n > len(order):
            raise DiscoveryError(f"top-n {top_n} is larger than the number of heads ({len(order)}); choose at most that")
        chosen = order[:top_n]
    else:
        bound = threshold if threshold is not None else DEFAULT_FRACTION * float(effect.max())
        chosen = [i for i in order if float(effect[i]) >= bound and float(effect[i]) > 0]
    return [hmap.nodes[i] for i in chosen]


@dataclass(frozen=True)
class HeadsParams:
    """ablation: corrupt only. score_metric: a task metric (the task's own when None; kl = KL to the clean
    run). Selection, at most one of: top_n (heads), threshold (|effect| >= it); default |effect| >=
    0.2 x the largest. seed: for the faithfulness evaluator. curve: measure the faithfulness curve over the
    number of kept heads."""

    ablation: str = "corrupt"
    score_metric: str | None = None
    top_n: int | None = None
    threshold: float | None = None
    seed: int = 0
    curve: bool = True

    def __post_init__(self) -> None:
        check_heads_ablation(self.ablation)
        check_heads_metric(self.score_metric)
        if self.top_n is not None and self.threshold is not None:
            raise DiscoveryError("choose one way to select the heads, got top_n and threshold (mutually exclusive)")
        if self.top_n is not None:
            check_top_n(self.top_n)
        if self.threshold is not None:
            check_threshold(self.threshold)

    @property
    def selection(self) -> tuple[str, float]:
        if self.top_n is not None:
            return "top_n", self.top_n
        if self.threshold is not None:
            return "threshold", self.threshold
        return "fraction_of_max", DEFAULT_FRACTION


def discover_heads(model: Model, task: Task | None, params: HeadsParams) -> NodeDiscovery:
    """The head map, the circuit of the kept heads (with every MLP), its faithfulness and curve."""
    assert task is not None  # the entry requires a task
    if params.score_metric is not None:
        task = task.with_metric(params.score_metric)
    graph = Graph.from_model(model)
    prepared = task.prepare(model)
    hmap = head_map(model, prepared)
    kept = select_heads(hmap, top_n=params.top_n, threshold=params.threshold)
    mlps = every_mlp(graph)
    ranked = [hmap.nodes[i] for i in hmap.ranked()]
    circuit, faithful, curve = measure_nodes(model, prepared, graph, kept, ranked, ablation=params.ablation,
                                             metric=prepared.metric_name, seed=params.seed, always=mlps,
                                             curve=params.curve)
    return head_map_discovery(hmap, prepared, circuit, kept, faithful, curve, params.selection, params.ablation,
                              len(mlps))


def every_mlp(graph: Graph) -> list[str]:
    """Every MLP node: a circuit of heads from the head map keeps them all (the map ranks heads only)."""
    return [] if graph.shape.attn_only else [mlp_name(layer) for layer in range(graph.shape.n_layers)]


def head_map_discovery(hmap: HeadMap, prepared: PreparedTask, circuit: Circuit, kept: list[str], faithful: float,
                       curve: FaithfulnessCurve | None, selection: tuple[str, float], ablation: str,
                       n_mlps: int) -> NodeDiscovery:
    """The head map's node-level discovery result: per-head effects as node scores, the kept heads' circuit
    and its faithfulness, the patching figures and patching.json."""
    sweep = hmap.sweep
    ranked = [hmap.nodes[i] for i in hmap.ranked()]
    scores = dict(zip(hmap.nodes, hmap.effects.tolist(), strict=True))
    info = {"metric": prepared.metric_name, "direction": "noise", "ablation": ablation,
            "n_prompts": prepared.n_prompts, "clean_mean": float(sweep.clean.mean()),
            "corrupt_mean": float(sweep.corrupt.mean()), "mlps_kept": n_mlps,
            "strongest_heads": [f"{node} ({scores[node]:.4g})" for node in ranked[:5]]}
    return NodeDiscovery("heads", circuit, kept, scores, hmap.records(), faithful, curve, selection, info,
                         patching_figures(sweep), {"patching.json": sweep.to_json()})
