"""Node-level circuits: the circuit of a set of nodes, its faithfulness curve over a node ranking, and the
`NodeDiscovery` result that node-level methods (``discover/grad``, ``discover/heads``, the QA study) return.

A node-level circuit keeps every edge among its nodes, from the input into them and from them into the
logits (the input and the logits belong to every such circuit). Its faithfulness curve ranks nodes, not
edges: point k keeps the top k nodes. See docs/METHODS.md, "Parameter-gradient importance" and
"Head-level causal map".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool

from circuitlab.discovery.faithfulness import CircuitEvaluator, FaithfulnessCurve, finish_curve
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.mib_json import to_mib_dict
from circuitlab.models.model import Model
from circuitlab.progress import status
from circuitlab.tasks.task import PreparedTask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NODE_CURVE_POINTS = 12  # node-count grid of the faithfulness curve of node-level methods


def node_mask(graph: Graph, nodes: list[str] | set[str]) -> Bool[torch.Tensor, " edge"]:
    """The edges among `nodes`, from the input into them and from them into the logits (the input and the
    logits are always in a node-level circuit; the direct input -> logits edge too)."""
    keep = set(nodes) | {"input", "logits"}
    for node in nodes:
        graph.check_node(node)
    sender_in = torch.tensor([s in keep for s in graph.senders])
    receiver_in = torch.tensor([r.split("<")[0] in keep for r in graph.receivers])
    return sender_in[graph.edge_src] & receiver_in[graph.edge_dst]


def node_curve(evaluator: CircuitEvaluator, ranked: list[str], always: Sequence[str] = ()) -> FaithfulnessCurve:
    """Faithfulness of the circuits of the top-k ranked nodes (plus `always`) for k on a grid of node counts,
    plotted against their edge fraction; the first and last points are k = 0 and every node."""
    graph = evaluator.graph
    n = len(ranked)
    counts = sorted({round(n * i / (NODE_CURVE_POINTS - 1)) for i in range(NODE_CURVE_POINTS)} | {0, 1, 2, n})
    counts = [k for k in counts if k <= n]
    masks = torch.stack([node_mask(graph, [*always, *ranked[:k]]) for k in counts])
    return finish_curve(masks, evaluator.metric(masks), evaluator.full, evaluator.empty, evaluator.scorer.name)


@dataclass
class NodeDiscovery:
    """A node-level discovery run: the node ranking (`nodes` records), the circuit of the kept nodes, its
    faithfulness (NaN when undefined) and the faithfulness curve over node counts (None when undefined)."""

    method: str
    circuit: Circuit
    kept: list[str]
    node_scores: dict[str, float]
    node_records: list[dict[str, Any]]
    faithfulness: float
    curve: FaithfulnessCurve | None
    selection: tuple[str, float | None]
    info: dict[str, Any] = field(default_factory=dict)
    extra_figures: dict[str, Figure] = field(default_factory=dict)
    extra_files: dict[str, str] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        kept = set(self.kept)
        return [{**row, "in_circuit": row["node"] in kept} for row in self.node_records]

    def summary(self) -> dict[str, Any]:
        stats = self.circuit.stats()
        mode, value = self.selection
        out = {"method": self.method, **self.info, "selection": mode, "selection_value": value,
               "kept_nodes": list(self.kept), "n_kept": len(self.kept), "circuit_edges": stats["n_edges"],
               "circuit_nodes": stats["n_nodes"], "circuit_heads": stats["n_heads"],
               "circuit_mlps": stats["n_mlps"], "edge_fraction": stats["edge_fraction"],
               "faithfulness": self.faithfulness, "graph_edges": self.circuit.graph.n_edges}
        if self.curve is not None:
            out.update({"cpr": self.curve.cpr, "cmd": self.curve.cmd, "full_metric": self.curve.full,
                        "empty_metric": self.curve.empty})
        return out

    def figures(self) -> dict[str, Figure]:
        from circuitlab.graph.draw import circuit_figure

        drawn, note = self._drawn()
        title = (f"{self.method} circuit: {len(self.kept)} nodes, {self.circuit.n_edges} edges, "
                 f"faithfulness {self.faithfulness:.3f}{note}")
        figures = {"circuit.png": circuit_figure(drawn, title=title), **self.extra_figures}
        if self.curve is not None:
            points = sum(1 for x in self.curve.fractions if x > 0)
            figures["faithfulness.png"] = self.curve.figure(
                marker=(self.circuit.n_edges, self.faithfulness),
                title=f"faithfulness of the top-k {self.method} nodes ({self.curve.metric}, {points} sizes)")
        return figures

    def files(self) -> dict[str, str]:
        from circuitlab.graph.draw import circuit_dot

        drawn, _ = self._drawn()
        return {"circuit.json": self.circuit_json(), "circuit.dot": circuit_dot(drawn), **self.extra_files}

    def circuit_json(self) -> str:
        """The EAP-IG / MIB layout; node scores are the method's, edges carry no score of their own (0)."""
        return json.dumps(to_mib_dict(self.circuit.graph, self.circuit.in_graph, None, self.node_scores))

    def _drawn(self) -> tuple[Circuit, str]:
        """The edges between kept nodes before the input's (a node circuit has many input edges)."""
        from circuitlab.graph.draw import drawn_subset

        return drawn_subset(self.circuit, (self.circuit.graph.edge_src != 0).float())


def measure_nodes(model: Model, prepared: PreparedTask, graph: Graph, kept: list[str], ranked: list[str], *,
                  ablation: str = "corrupt", metric: str | None = None, seed: int = 0, always: Sequence[str] = (),
                  curve: bool = True) -> tuple[Circuit, float, FaithfulnessCurve | None]:
    """The node circuit of `kept` (+ `always`), its faithfulness and (with `curve`) the curve over top-k of
    `ranked`; NaN and no curve when faithfulness is undefined (the ablation does not change the metric)."""
    circuit = Circuit(graph, node_mask(graph, [*always, *kept]), model=model)
    with status("measuring faithfulness"):
        evaluator = CircuitEvaluator(model, prepared, ablation=ablation, metric=metric, graph=graph, seed=seed,
                                     check=False)
        if evaluator.undefined() is not None:
            return circuit, math.nan, None
        faithful = float(evaluator.faithfulness(circuit.in_graph.unsqueeze(0))[0])
        points = node_curve(evaluator, ranked, list(always)) if curve else None
    return circuit, faithful if math.isfinite(faithful) else math.nan, points
