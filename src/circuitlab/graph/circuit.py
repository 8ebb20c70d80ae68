"""`Circuit`: a set of edges of a model's graph (its nodes follow from the edges), with optional scores.

A circuit runs with everything outside it ablated (`circuit.run`), saves/loads in the EAP-IG / MIB JSON
layout, supports set operations and overlap measures, and can drop dangling edges (edges not on any
input -> logits path inside the circuit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.graph import Graph, GraphShape
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.mib_json import read_mib_json, write_mib_json
from circuitlab.models.model import Model

EdgeScores = Float[torch.Tensor, " edge"]


@dataclass(eq=False)
class Circuit:
    """graph: the full edge graph; in_graph: [n_edges] bool; scores: optional [n_edges] float.

    model: the circuitlab Model the circuit belongs to (needed by `run`; optional otherwise).
    """

    graph: Graph
    in_graph: Bool[torch.Tensor, " edge"]
    scores: EdgeScores | None = None
    node_scores: dict[str, float] | None = None
    model: Model | None = None
    _engine: MaskedEdgeEngine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.in_graph.shape) != (self.graph.n_edges,):
            raise GraphError(f"in_graph must have shape [{self.graph.n_edges}], got {tuple(self.in_graph.shape)}")
        self.in_graph = self.in_graph.bool()
        if self.scores is not None and tuple(self.scores.shape) != (self.graph.n_edges,):
            raise GraphError(f"scores must have shape [{self.graph.n_edges}], got {tuple(self.scores.shape)}")
        if self.model is not None:
            _check_model(self.graph, self.model)

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_edges(cls, graph: Graph, edges: list[str], scores: EdgeScores | None = None,
                   model: Model | None = None) -> Circuit:
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        mask[graph.edge_ids(edges)] = True
        return cls(graph, mask, scores, model=model)

    @classmethod
    def full(cls, graph: Graph, model: Model | None = None) -> Circuit:
        return cls(graph, torch.ones(graph.n_edges, dtype=torch.bool), model=model)

    @classmethod
    def empty(cls, graph: Graph, model: Model | None = None) -> Circuit:
        return cls(graph, torch.zeros(graph.n_edges, dtype=torch.bool), model=model)

    @classmethod
    def top_n(cls, graph: Graph, scores: EdgeScores, n: int, *, absolute: bool = True,
              model: Model | None = None) -> Circuit:
        """The n highest-scoring edges (by |score| when absolute), scores kept."""
        if not 0 <= n <= graph.n_edges:
            raise GraphError(f"n must lie in [0, {graph.n_edges}], got {n}")
        key = scores.abs() if absolute else scores
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        mask[torch.topk(key, n).indices] = True
        return cls(graph, mask, scores.detach().clone(), model=model)

    # --- contents -------------------------------------------------------------------------------------
    @property
    def edges(self) -> list[str]:
        return [self.graph.edges[e] for e in torch.nonzero(self.in_graph).flatten().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by an edge of the circuit, in graph order."""
        idx = torch.nonzero(self.in_graph).flatten()
        touched = set(self.graph.senders[i] for i in self.graph.edge_src[idx].tolist())
        touched |= {self.graph.receivers[j].split("<")[0] for j in self.graph.edge_dst[idx].tolist()}
        return [n for n in self.graph.nodes if n in touched]

    @property
    def n_edges(self) -> int:
        return int(self.in_graph.sum())

    def __len__(self) -> int:
        return self.n_edges

    def __contains__(self, edge: str) -> bool:
        return bool(self.in_graph[self.graph.edge_id(edge)])

    def stats(self) -> dict[str, int | float]:
        """Size statistics: edges (count, fraction, by receiver input kind), nodes, heads, MLPs."""
        nodes = self.nodes
        kinds = {"q": 0, "k": 0, "v": 0, "mlp": 0, "logits": 0}
        for e in torch.nonzero(self.in_graph).flatten().tolist():
            receiver = self.graph.receivers[int(self.graph.edge_dst[e])]
            kind = receiver[-2] if receiver.endswith(">") else ("logits" if receiver == "logits" else "mlp")
            kinds[kind] += 1
        return {
            "n_edges": self.n_edges, "edge_fraction": self.n_edges / self.graph.n_edges,
            "n_nodes": len(nodes), "n_heads": sum(n.startswith("a") for n in nodes),
            "n_mlps": sum(n.startswith("m") for n in nodes),
            **{f"edges_into_{k}": v for k, v in kinds.items()},
            "graph_edges": self.graph.n_edges,
        }

    # --- pruning --------------------------------------------------------------------------------------
    def pruned(self) -> Circuit:
        """Drop dangling edges: keep an edge only if its sender is reachable from input and its receiver
        reaches logits through circuit edges (the fixpoint of EAP-IG's `prune`)."""
        g = self.graph
        node_of_receiver = torch.tensor([g.sender_index.get(r.split("<")[0], g.n_senders) for r in g.receivers])
        dst_node = node_of_receiver[g.edge_dst]  # [n_edges] forward index of the receiving node (logits = n_senders)
        idx = torch.nonzero(self.in_graph).flatten()
        src, dst = g.edge_src[idx].tolist(), dst_node[idx].tolist()
        forward = [False] * (g.n_senders + 1)
        forward[0] = True
        for s, d in sorted(zip(src, dst, strict=True)):
            if forward[s]:
                forward[d] = True
        backward = [False] * (g.n_senders + 1)
        backward[g.n_senders] = True
        for s, d in sorted(zip(src, dst, strict=True), key=lambda e: -e[1]):
            if backward[d]:
                backward[s] = True
        keep = torch.tensor([forward[s] and backward[d] for s, d in zip(src, dst, strict=True)], dtype=torch.bool)
        mask = torch.zeros_like(self.in_graph)
        mask[idx[keep]] = True
        return self._with(mask)

    # --- set operations and overlap -------------------------------------------------------------------
    def _check_same(self, other: Circuit) -> None:
        if not self.graph.shape.compatible_with(other.graph.shape):
            raise GraphError(
                f"circuits are for different graphs ({self.graph.shape.describe()} vs {other.graph.shape.describe()})")

    def _with(self, mask: torch.Tensor) -> Circuit:
        return Circuit(self.graph, mask, self.scores, self.node_scores, self.model)

    def union(self, other: Circuit) -> Circuit:
        self._check_same(other)
        return self._with(self.in_graph | other.in_graph)

    def intersection(self, other: Circuit) -> Circuit:
        self._check_same(other)
        return self._with(self.in_graph & other.in_graph)

    def difference(self, other: Circuit) -> Circuit:
        self._check_same(other)
        return self._with(self.in_graph & ~other.in_graph)

    __or__, __and__, __sub__ = union, intersection, difference

    def overlap(self, other: Circuit) -> dict[str, int | float]:
        """Jaccard of edges and of nodes; edge precision |A&B|/|A| and recall |A&B|/|B| (other = reference)."""
        self._check_same(other)
        both = int((self.in_graph & other.in_graph).sum())
        either = int((self.in_graph | other.in_graph).sum())
        nodes_a, nodes_b = set(self.nodes), set(other.nodes)
        return {
            "edge_jaccard": both / either if either else 1.0,
            "node_jaccard": len(nodes_a & nodes_b) / len(nodes_a | nodes_b) if nodes_a | nodes_b else 1.0,
            "edge_precision": both / self.n_edges if self.n_edges else 0.0,
            "edge_recall": both / other.n_edges if other.n_edges else 0.0,
            "shared_edges": both,
        }

    # --- files ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the EAP-IG / MIB JSON layout."""
        return write_mib_json(path, self.graph, self.in_graph, self.scores, self.node_scores)

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> Circuit:
        """Read an EAP-IG / MIB JSON circuit; with `model`, a clear error when it was made for another shape."""
        data = read_mib_json(path)
        if model is not None:
            _check_model(data.graph, model, source=str(path))
            data.graph = Graph(GraphShape.from_model(model)) if data.graph.shape.d_model is None else data.graph
        return cls(data.graph, data.in_graph, data.scores, data.node_scores, model)

    # --- running --------------------------------------------------------------------------------------
    def coefficients(self) -> Float[torch.Tensor, " edge"]:
        return self.in_graph.float()

    def engine(self) -> MaskedEdgeEngine:
        if self.model is None:
            raise GraphError("this circuit has no model; create or load it with model=... to run it")
        if self._engine is None:
            self._engine = MaskedEdgeEngine(self.model, self.graph)
        return self._engine

    def run(self, tokens: Int[torch.Tensor, "batch pos"], ablation: str = "corrupt", *,
            corrupt: Int[torch.Tensor, "batch pos"] | None = None, reference: Int[torch.Tensor, "n pos"] | None = None,
            seed: int = 0) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits [batch, pos, vocab] with every edge outside the circuit ablated (see ablation.py)."""
        engine = self.engine()
        ablated = ablated_outputs(engine, ablation, tokens, corrupt=corrupt, reference=reference, seed=seed)
        with torch.no_grad():
            return engine.run(tokens, self.coefficients(), ablated)

    def draw(self, path_stem: str | Path, *, title: str | None = None, min_width: float = 0.4,
             max_width: float = 4.0) -> list[Path]:
        """PNG + SVG (matplotlib) and a Graphviz .dot file; see draw.py."""
        from circuitlab.graph.draw import draw_circuit  # matplotlib only when drawing

        return draw_circuit(self, path_stem, title=title, min_width=min_width, max_width=max_width)

    def __repr__(self) -> str:
        return f"Circuit({self.n_edges} of {self.graph.n_edges} edges, {len(self.nodes)} nodes)"


def _check_model(graph: Graph, model: Model, source: str = "circuit") -> None:
    shape = GraphShape.from_model(model)
    if not graph.shape.compatible_with(shape):
        raise GraphError(
            f"{source} was made for a model with {graph.shape.describe()}, but {model.spec} "
            f"has {shape.describe()}; load it with the model it was made for"
        )
