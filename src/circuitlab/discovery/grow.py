"""`discover/grow`: expand-and-prune from seed nodes (the logits by default).

Edge scores (EAP-IG by default, or EAP or exact effects; `edge_scores`) are computed once. The search keeps
a circuit C (edges tried and kept), a set R of rejected edges (tried and removed) and the node set
V = seeds + nodes of C. Edges not tried yet are *undecided*: the search state S runs every edge not in R,
so that an edge is judged with its surroundings still working. Each round:

1. **expand**: add to C the `per_round` best-scoring (|score|) untried edges adjacent to V (sender or
   receiver in V), fewer if `max_edges` leaves less room;
2. **prune**: S runs with every single edge of C removed (one batched evaluation, `CircuitEvaluator`); the
   edges whose removal changes the normalised faithfulness f(S) by less than `epsilon` are removed,
   smallest change first, as many as keep the combined change below `epsilon` (the nested removals are one
   more batched evaluation); removed edges join R for good;
3. V = seeds + nodes of C.

Why undecided edges stay in S: from the logits, a head's edge into the logits matters only while the
head's own inputs work; in C alone (everything else ablated) it would look useless before those inputs
are chosen, and a node's true inputs, added a few per round, would each look useless while the others
are still ablated. The output is C alone (faithfulness measured with everything else ablated). The search
stops when a round leaves C unchanged (its best remaining candidates do not matter), when C reaches
`max_edges`, or when no candidate is left; it ends after at most n_edges rounds, since every round tries
at least one new edge. Each round is logged: size, f(S) and the faithfulness of C alone. See
docs/METHODS.md, "Expand-and-prune".
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool

from circuitlab.analysis import Analysis
from circuitlab.discovery.analysis import Discovery, answers_optional
from circuitlab.discovery.faithfulness import CircuitEvaluator, faithfulness_curve, faithfulness_of
from circuitlab.discovery.metrics import check_metric_name
from circuitlab.discovery.scores import EdgeScoring, check_ablation, check_method, check_steps, edge_scores
from circuitlab.discovery.selection import check_edge_count, ranking_key
from circuitlab.errors import DiscoveryError
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar, status
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Mask = Bool[torch.Tensor, " edge"]
DEFAULT_EPSILON = 0.01  # 1% of the full model's behaviour (normalised faithfulness)
DEFAULT_PER_ROUND = 10


@dataclass(frozen=True)
class GrowParams:
    """ablation: corrupt | mean | zero | resample. score_metric: the task's metric when None, or kl / l2.
    positions: last | all. seed_nodes: the nodes to grow from (default: the logits). max_edges: stop at
    this many edges (default: no cap). scorer: eap-ig | eap | exact (the edge scores ranking candidates);
    steps: EAP-IG interpolation points. epsilon: an edge whose removal changes faithfulness by less is
    pruned. per_round: edges added per round. seed: for the ablation (mean / resample). curve: also
    measure the faithfulness curve of the top-n edges by score (CPR, CMD; faithfulness.png)."""

    ablation: str = "corrupt"
    score_metric: str | None = None
    positions: str = "last"
    seed_nodes: tuple[str, ...] | None = None
    max_edges: int | None = None
    scorer: str = "eap-ig"
    steps: int = 5
    epsilon: float = DEFAULT_EPSILON
    per_round: int = DEFAULT_PER_ROUND
    seed: int = 0
    curve: bool = True

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        check_metric_name(self.score_metric, self.positions)
        check_method(self.scorer)
        check_steps(self.steps)
        if self.seed_nodes is not None:
            if isinstance(self.seed_nodes, str) or not all(isinstance(s, str) and s for s in self.seed_nodes):
                raise DiscoveryError(f"seed nodes must be a tuple of node names such as ('a1.h0', 'm0'), "
                                     f"got {self.seed_nodes!r}")
            if not self.seed_nodes:
                raise DiscoveryError("seed nodes must name at least one node (or leave them out: the logits)")
        for name in ("max_edges", "per_round"):
            if (value := getattr(self, name)) is not None:
                check_edge_count(value, name.replace("_", " "), minimum=1)
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise DiscoveryError(f"epsilon must be a number >= 0 (a change of normalised faithfulness), got {eps!r}")


def check_seed_nodes(graph: Graph, names: tuple[str, ...]) -> tuple[str, ...]:
    """Every name a node of `graph`; a DiscoveryError naming the close ones otherwise."""
    for name in names:
        if name not in graph.nodes:
            close = difflib.get_close_matches(name, graph.nodes, n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise DiscoveryError(f"unknown seed node {name!r}: the graph ({graph.shape.describe()}) has nodes "
                                 f"input, a<layer>.h<head>, m<layer>, logits{hint}")
    return names


@dataclass
class GrowRound:
    """One round: edges added and pruned, the circuit's size after it, f of the search state and of C alone."""

    round: int
    added: int
    pruned: int
    circuit_edges: int
    state_faithfulness: float
    circuit_faithfulness: float


@dataclass
class Growth:
    """The grown circuit's mask, the rounds, and why the search stopped."""

    mask: Mask
    rounds: list[GrowRound]
    stopped: str


def grow_circuit(evaluator: CircuitEvaluator, scores: torch.Tensor, seeds: tuple[str, ...] = ("logits",), *,
                 max_edges: int | None = None, epsilon: float = DEFAULT_EPSILON,
                 per_round: int = DEFAULT_PER_ROUND) -> Growth:
    """Expand-and-prune (see the module docstring) on the evaluator's task, ablation and metric."""
    graph = evaluator.graph
    check_seed_nodes(graph, seeds)
    n_edges = graph.n_edges
    cap = n_edges if max_edges is None else min(max_edges, n_edges)
    sender_node = [graph.senders[s] for s in graph.edge_src.tolist()]
    receiver_node = [graph.receivers[r].split("<")[0] for r in graph.edge_dst.tolist()]
    key = ranking_key(scores)
    kept = torch.zeros(n_edges, dtype=torch.bool)
    rejected = torch.zeros(n_edges, dtype=torch.bool)
    nodes = set(seeds)
    rounds: list[GrowRound] = []
    stopped = "no candidate edge left"
    with progress_bar(math.ceil(n_edges / per_round), "expand-and-prune") as advance:
        while True:
            into = torch.tensor([r in nodes for r in receiver_node])
            out_of = torch.tensor([s in nodes for s in sender_node])
            candidates = (into | out_of) & ~kept & ~rejected
            room = cap - int(kept.sum())
            if room <= 0:
                stopped = f"max edges ({cap}) reached"
                break
            if not candidates.any():
                break
            before = kept.clone()
            order = torch.argsort(torch.where(candidates, key, -math.inf), descending=True, stable=True)
            added = order[:min(per_round, room, int(candidates.sum()))]
            kept[added] = True
            state = ~rejected  # C and the undecided edges
            removed, f_state = _prune(evaluator, state, kept, epsilon)
            kept[removed] = False
            rejected[removed] = True
            f_circuit = float(evaluator.faithfulness(kept.unsqueeze(0))[0])
            rounds.append(GrowRound(len(rounds) + 1, len(added), len(removed), int(kept.sum()), f_state, f_circuit))
            advance(1, f"round {len(rounds)}: {int(kept.sum())} edges, f {f_circuit:.3f}")
            nodes = set(seeds) | {sender_node[e] for e in kept.nonzero().flatten().tolist()} | {
                receiver_node[e] for e in kept.nonzero().flatten().tolist()}
            if torch.equal(kept, before):
                stopped = f"circuit unchanged in round {len(rounds)}"
                break
    return Growth(kept, rounds, stopped)


def _prune(evaluator: CircuitEvaluator, state: Mask, kept: Mask, epsilon: float) -> tuple[list[int], float]:
    """The edges of `kept` to remove from `state` (see the module docstring), and f of the pruned state."""
    ids = kept.nonzero().flatten()
    singles = state.unsqueeze(0).repeat(len(ids) + 1, 1)
    singles[torch.arange(1, len(ids) + 1), ids] = False  # row 0: the state itself
    f = evaluator.faithfulness(singles)
    base, change = float(f[0]), (f[1:] - f[0]).abs()
    small = change < epsilon
    if not small.any():
        return [], base
    order = ids[small][torch.argsort(change[small], stable=True)]
    nested = state.unsqueeze(0).repeat(len(order), 1)
    for j in range(len(order)):
        nested[j:, order[j]] = False  # row j removes the j + 1 smallest
    combined = evaluator.faithfulness(nested)
    within = ((combined - base).abs() < epsilon).tolist()
    n = within.index(False) if False in within else len(within)
    return order[:n].tolist(), float(combined[n - 1]) if n else base


# --- the analysis -------------------------------------------------------------------------------------------

@dataclass
class GrowDiscovery(Discovery):
    """A `Discovery` of the grown circuit (scores: the ranking scores), plus the rounds (grow.png)."""

    growth: Growth | None = field(default=None)
    seeds: tuple[str, ...] = ("logits",)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        assert self.growth is not None
        out.update({"seed_nodes": list(self.seeds), "rounds": len(self.growth.rounds), "stopped": self.growth.stopped,
                    "round_log": [f"round {r.round}: +{r.added} -{r.pruned} -> {r.circuit_edges} edges, "
                                  f"f {r.circuit_faithfulness:.3f} (search state {r.state_faithfulness:.3f})"
                                  for r in self.growth.rounds]})
        return out

    def figures(self) -> dict[str, Figure]:
        figures = super().figures()
        figures["grow.png"] = self.round_figure()
        return figures

    def files(self) -> dict[str, str]:
        assert self.growth is not None
        names = ["round", "added", "pruned", "circuit_edges", "state_faithfulness", "circuit_faithfulness"]
        rows = [",".join(names)] + [",".join(f"{getattr(r, n):.6g}" for n in names) for r in self.growth.rounds]
        return {**super().files(), "grow_log.csv": "\n".join(rows) + "\n"}

    def round_figure(self) -> Figure:
        """grow.png: circuit size and faithfulness (of C alone and of the search state) per round."""
        from matplotlib.figure import Figure

        assert self.growth is not None
        fig = Figure(figsize=(6.0, 3.2), dpi=150)
        ax = fig.add_subplot()
        rounds = [r.round for r in self.growth.rounds]
        ax.plot(rounds, [r.circuit_edges for r in self.growth.rounds], "o-", color="#d62728", label="edges")
        ax.set_xlabel("round")
        ax.set_ylabel("circuit edges")
        right = ax.twinx()
        right.plot(rounds, [r.circuit_faithfulness for r in self.growth.rounds], "s-", color="#1f77b4",
                   label="faithfulness (circuit)")
        right.plot(rounds, [r.state_faithfulness for r in self.growth.rounds], ":", color="#1f77b4",
                   label="faithfulness (search state)")
        right.set_ylabel("normalised faithfulness")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [str(line.get_label()) for line in lines], fontsize=7, frameon=False)
        ax.set_title(f"expand-and-prune from {', '.join(self.seeds)}: {self.growth.stopped}", fontsize=9)
        fig.tight_layout()
        return fig


def grow(model: Model, task: Task, params: GrowParams) -> GrowDiscovery:
    """Score the edges once, grow the circuit, measure it and the scores' faithfulness curve."""
    graph = Graph.from_model(model)
    seeds = check_seed_nodes(graph, params.seed_nodes or ("logits",))  # before any model run
    prepared = task.prepare(model)
    scoring: EdgeScoring = edge_scores(model, prepared, method=params.scorer, ablation=params.ablation,
                                       metric=params.score_metric, positions=params.positions, steps=params.steps,
                                       graph=graph, seed=params.seed)
    evaluator = CircuitEvaluator(model, prepared, ablation=params.ablation, metric=params.score_metric,
                                 positions=params.positions, graph=graph, seed=params.seed)
    growth = grow_circuit(evaluator, scoring.scores, seeds, max_edges=params.max_edges, epsilon=params.epsilon,
                          per_round=params.per_round)
    circuit = Circuit(graph, growth.mask, scoring.scores.detach().clone(), model=model)
    with status("measuring faithfulness"):
        # the last round measured the final circuit already (no round: the seeds alone, measured here)
        rounds = growth.rounds
        faithful = faithfulness_of(evaluator, circuit) if not rounds else rounds[-1].circuit_faithfulness
        faithful = faithful if math.isfinite(faithful) else math.nan
        curve = faithfulness_curve(evaluator, scoring) if params.curve else None
    return GrowDiscovery(scoring, circuit, faithful, curve, ("epsilon", params.epsilon), growth=growth, seeds=seeds)


def _compute(model: Model, task: Task | None, params: GrowParams) -> GrowDiscovery:
    assert task is not None  # the entry requires a task
    return grow(model, task, params)


GROW = Analysis("discover/grow", "circuit discovery by expand-and-prune from seed nodes (default: the logits)",
                GrowParams, _compute, task_source=answers_optional)
