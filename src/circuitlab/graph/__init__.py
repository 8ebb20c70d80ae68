"""The computational (edge) graph, masked-edge runs, circuits as data, and path patching.

Verbs: `path_patch`, `path_patch_classic`, `path_patch_sweep`, `path_patch_task` (a whole task, every
token-length group), `ablated_outputs`. Types: `Graph`, `Circuit`, `MaskedEdgeEngine` (what the verbs
run on), and the results `PathPatchSweep`, `PathPatchRun`. See docs/METHODS.md, "Edge graph",
"Masked-edge runs and ablations" and "Path patching".
"""

from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.analysis import PathPatchRun, path_patch_task
from circuitlab.graph.circuit import Circuit
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import PathPatchSweep, path_patch, path_patch_classic, path_patch_sweep

__all__ = [
    "Circuit", "Graph", "MaskedEdgeEngine", "PathPatchRun", "PathPatchSweep", "ablated_outputs", "path_patch",
    "path_patch_classic", "path_patch_sweep", "path_patch_task",
]
