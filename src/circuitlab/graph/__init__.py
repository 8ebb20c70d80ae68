"""The computational (edge) graph, masked-edge runs, circuits as data, and path patching."""

from circuitlab.graph.ablation import ABLATIONS, ablated_outputs
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph, GraphShape, count_edges
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_patch, path_patch_classic, path_patch_sweep

__all__ = [
    "ABLATIONS", "Circuit", "Graph", "GraphShape", "MaskedEdgeEngine", "ablated_outputs", "count_edges",
    "path_patch", "path_patch_classic", "path_patch_sweep",
]
