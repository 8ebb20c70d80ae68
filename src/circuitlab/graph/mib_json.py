"""Read and write circuits in the JSON layout of EAP-IG (`Graph.to_json`) and the MIB benchmark.

    {"cfg": {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768, ...},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false, "score": 0.1}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": 0.02, "in_graph": false}, ...}}

Node "score" is optional (written only when node scores exist). Writing lists every node and edge in
EAP-IG's order, as EAP-IG does. Reading accepts files that list only some edges (absent edges are out of
the circuit with score 0, as in EAP-IG's `from_json`), extra cfg keys, and rejects unknown names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitlab.atomic import write_text_atomically
from circuitlab.errors import GraphError
from circuitlab.graph.graph import Graph, GraphShape


@dataclass
class MibCircuitData:
    """The content of one file: graph shape, edge membership and scores, optional node scores."""

    graph: Graph
    in_graph: torch.Tensor  # [n_edges] bool
    scores: torch.Tensor  # [n_edges] float
    node_scores: dict[str, float] | None = None
    nodes_in_graph: dict[str, bool] | None = None


def to_mib_dict(graph: Graph, in_graph: torch.Tensor, scores: torch.Tensor | None = None,
                node_scores: dict[str, float] | None = None) -> dict:
    """The EAP-IG/MIB layout. A node is in the graph when an in-circuit edge touches it (logits always)."""
    flags = in_graph.tolist()
    values = scores.tolist() if scores is not None else [0.0] * graph.n_edges
    touched = {"logits"}
    for e in torch.nonzero(in_graph).flatten().tolist():
        touched.add(graph.senders[int(graph.edge_src[e])])
        touched.add(graph.receivers[int(graph.edge_dst[e])].split("<")[0])
    nodes: dict[str, dict] = {}
    for node in graph.nodes:
        entry: dict = {"in_graph": node in touched}
        if node_scores is not None and node in node_scores:
            entry["score"] = float(node_scores[node])
        nodes[node] = entry
    edges = {name: {"score": float(v), "in_graph": bool(f)} for name, v, f in zip(graph.edges, values, flags, strict=True)}
    return {"cfg": graph.shape.to_cfg(), "nodes": nodes, "edges": edges}


def from_mib_dict(data: dict, source: str = "circuit") -> MibCircuitData:
    """Parse the layout; GraphError on missing keys, unknown node or edge names, or bad values."""
    if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise GraphError(f"{source}: not an EAP-IG/MIB circuit file; expected keys 'cfg', 'nodes', 'edges', got {keys}")
    graph = Graph(GraphShape.from_cfg(data["cfg"]))
    in_graph = torch.zeros(graph.n_edges, dtype=torch.bool)
    scores = torch.zeros(graph.n_edges)
    for name, info in data["edges"].items():
        e = _known_edge(graph, name, source)
        if not isinstance(info, dict) or "in_graph" not in info:
            raise GraphError(f"{source}: edge {name!r} must map to {{'score': float, 'in_graph': bool}}, got {info!r}")
        in_graph[e] = bool(info["in_graph"])
        score = info.get("score", 0.0)
        scores[e] = float("nan") if score is None else float(score)
    node_scores: dict[str, float] = {}
    nodes_in_graph: dict[str, bool] = {}
    for name, info in data["nodes"].items():
        if name not in graph.sender_index and name != "logits":
            graph.check_node(name)  # raises with the reason
        if isinstance(info, dict):
            nodes_in_graph[name] = bool(info.get("in_graph", False))
            if info.get("score") is not None and not (isinstance(info["score"], float) and math.isnan(info["score"])):
                node_scores[name] = float(info["score"])
        else:  # older files map node -> bool
            nodes_in_graph[name] = bool(info)
    return MibCircuitData(graph, in_graph, scores, node_scores or None, nodes_in_graph)


def _known_edge(graph: Graph, name: str, source: str) -> int:
    try:
        return graph.edge_id(name)
    except GraphError as exc:
        raise GraphError(f"{source}: {exc}") from exc


def write_mib_json(path: str | Path, graph: Graph, in_graph: torch.Tensor, scores: torch.Tensor | None = None,
                   node_scores: dict[str, float] | None = None) -> Path:
    return write_text_atomically(path, json.dumps(to_mib_dict(graph, in_graph, scores, node_scores)))


def read_mib_json(path: str | Path) -> MibCircuitData:
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"no circuit file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GraphError(f"{path} is not valid JSON ({exc})") from exc
    return from_mib_dict(data, source=str(path))
