"""Activation patching (sweeps over sites x layers x positions x heads, fast) and ROME causal tracing.

Run them through `circuitlab.runner.run("patch" | "trace" | "trace/average", ...)`, or use the verbs
directly: ``ActivationPatcher(model, prepared).sweep(site, by)`` and ``CausalTracer(...).trace(kind)``.
"""

from circuitlab.patching.causal_trace import AverageTrace, CausalTracer, TraceGrid, average_indirect_effect
from circuitlab.patching.patcher import ActivationPatcher
from circuitlab.patching.result import PatchingResult

__all__ = [
    "ActivationPatcher", "PatchingResult", "CausalTracer", "TraceGrid", "average_indirect_effect", "AverageTrace",
]
