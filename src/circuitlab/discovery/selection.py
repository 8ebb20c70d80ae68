"""From edge scores to a circuit: top-n edges, an |score| threshold, or greedy from the logits backwards.

Edges are ranked by |score| (an edge whose ablation raises the metric matters as much as one that lowers
it); `absolute=False` ranks by the signed score, largest first. The smallest circuit that reaches a target
faithfulness needs masked runs and lives in faithfulness.py (`smallest_faithful_circuit`).

Greedy (EAP-IG's `apply_greedy`): start from the logits; repeatedly add the best-scoring edge whose receiver
is already in the circuit (at first: the edges into logits), so every chosen edge reaches the logits; then
drop the edges whose sender is not reached from the input (`Circuit.pruned`), so no edge dangles at
either end. The pruned circuit can be smaller than n. See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

import heapq
import math

import torch
from jaxtyping import Bool, Float

from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.models.model import Model

EdgeVector = Float[torch.Tensor, " edge"]
Mask = Bool[torch.Tensor, " edge"]


def ranking_key(scores: EdgeVector, absolute: bool = True) -> EdgeVector:
    """What edges are ranked by: |score| (or the score); NaN ranks last."""
    key = scores.abs() if absolute else scores.clone()
    return torch.nan_to_num(key, nan=-math.inf)


def check_edge_count(n: int, what: str, graph: Graph | None = None, *, minimum: int = 0) -> int:
    """An edge count `what` (e.g. "top-n") of at least `minimum`, at most the graph's size when it is known."""
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise DiscoveryError(f"{what} must be a {kind} integer number of edges, got {n!r}")
    if graph is not None and n > graph.n_edges:
        raise DiscoveryError(f"{what} {n} is larger than the graph, which has {graph.n_edges} edges "
                             f"({graph.shape.describe()}); choose at most {graph.n_edges}")
    return n


def check_top_n(n: int, graph: Graph | None = None) -> int:
    return check_edge_count(n, "top-n", graph)


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise DiscoveryError(f"threshold must be a number >= 0 (edges with |score| >= threshold are kept), got {threshold!r}")
    return float(threshold)


def check_target(target: float) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise DiscoveryError(f"target faithfulness must lie in (0, 1] (1 = the full model's metric), got {target!r}")
    return float(target)


def top_n_mask(scores: EdgeVector, n: int, *, absolute: bool = True) -> Mask:
    """The n best-ranked edges (ties: lower edge index first, so the result is deterministic)."""
    check_top_n(n)
    if n > scores.numel():
        raise DiscoveryError(f"top-n {n} is larger than the graph, which has {scores.numel()} edges")
    order = torch.argsort(ranking_key(scores, absolute), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:n]] = True
    return mask


def nested_masks(scores: EdgeVector, sizes: list[int], *, absolute: bool = True) -> Bool[torch.Tensor, "k edge"]:
    """[len(sizes), n_edges] masks of the top-n edges for each n (nested: one sort)."""
    order = torch.argsort(ranking_key(scores, absolute), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank.unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)


def threshold_mask(scores: EdgeVector, threshold: float, *, absolute: bool = True) -> Mask:
    """Edges with |score| >= threshold (score >= threshold when not absolute); NaN scores are never kept."""
    check_threshold(threshold)
    return ranking_key(scores, absolute) >= threshold


def greedy_mask(graph: Graph, scores: EdgeVector, n: int, *, absolute: bool = True, prune: bool = True) -> Mask:
    """Greedy from the logits backwards (see the module docstring); `prune` drops edges whose sender is not
    reached from the input."""
    check_top_n(n, graph)
    key = ranking_key(scores, absolute).tolist()
    # incoming[node]: edge ids into that node (any of its q/k/v inputs), node = receiver name without <q/k/v>.
    incoming: dict[str, list[int]] = {}
    for e, receiver in enumerate(graph.edge_dst.tolist()):
        incoming.setdefault(graph.receivers[receiver].split("<")[0], []).append(e)
    frontier: list[tuple[float, int]] = []
    reached: set[str] = set()

    def open_node(node: str) -> None:
        if node not in reached:
            reached.add(node)
            for e in incoming.get(node, []):
                heapq.heappush(frontier, (-key[e], e))

    open_node("logits")
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    chosen = 0
    while chosen < n and frontier:
        _, e = heapq.heappop(frontier)
        mask[e] = True
        chosen += 1
        open_node(graph.senders[int(graph.edge_src[e])])
    return Circuit(graph, mask).pruned().in_graph if prune else mask


def select(graph: Graph, scores: EdgeVector, *, top_n: int | None = None, threshold: float | None = None,
           greedy: bool = False, absolute: bool = True, model: Model | None = None) -> Circuit:
    """A circuit from scores by exactly one of `top_n` or `threshold` (greedy applies to top_n)."""
    if (top_n is None) == (threshold is None):
        raise DiscoveryError("choose exactly one of top-n or threshold")
    if top_n is not None:
        check_top_n(top_n, graph)
        mask = greedy_mask(graph, scores, top_n, absolute=absolute) if greedy else top_n_mask(scores, top_n, absolute=absolute)
    else:
        assert threshold is not None
        mask = threshold_mask(scores, threshold, absolute=absolute)
    return Circuit(graph, mask, scores.detach().clone(), model=model)
