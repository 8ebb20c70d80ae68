"""Circuit discovery: score every edge of the graph (EAP, EAP-IG, exact effects), turn scores into a
circuit (top-n, threshold, greedy from the logits, smallest circuit reaching a target faithfulness), and
measure circuits (normalised faithfulness, its curve over circuit sizes, CPR, CMD).

Verbs: `edge_scores`, `select`, `faithfulness_curve`, `smallest_faithful_circuit`, `discover`.
Types: `EdgeScoring`, `CircuitEvaluator` (what the faithfulness verbs run on), `FaithfulnessCurve`,
`Discovery`. See docs/METHODS.md, "Circuit discovery".
"""

from circuitlab.discovery.analysis import Discovery, discover
from circuitlab.discovery.faithfulness import (
    CircuitEvaluator,
    FaithfulnessCurve,
    faithfulness_curve,
    smallest_faithful_circuit,
)
from circuitlab.discovery.scores import EdgeScoring, edge_scores, node_scores
from circuitlab.discovery.selection import select

__all__ = [
    "CircuitEvaluator", "Discovery", "EdgeScoring", "FaithfulnessCurve", "discover", "edge_scores",
    "faithfulness_curve", "node_scores", "select", "smallest_faithful_circuit",
]
