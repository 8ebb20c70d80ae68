"""Attribution methods (docs/METHODS.md, "Direct logit attribution", "Integrated gradients", "Attention
rollout and flow", "Attention x gradient", "Attribution patching"): the verbs and what they return.

Each verb works on one `TaskBatch` (prompts of one token length). The registered analyses
(``attribute/dla``, ``attribute/ig``, ...; see `circuitlab.attribution.analysis`) run every batch of a task
and return the ``*Run`` result types. Plumbing (hooks, quadrature rules, figures) stays in the submodules.
"""

from circuitlab.attribution.analysis import (
    AttentionGradientRun,
    AttributionPatchingRun,
    DLARun,
    FlowRun,
    IGRun,
)
from circuitlab.attribution.attention_flow import attention_flow, attention_patterns, attention_rollout
from circuitlab.attribution.attention_gradient import AttentionGradient, attention_times_gradient
from circuitlab.attribution.attribution_patching import AttributionPatching, attribution_patching
from circuitlab.attribution.dla import ComponentAttribution, DirectLogitAttribution, direct_logit_attribution
from circuitlab.attribution.integrated_gradients import (
    IntegratedGradients,
    embedding_integrated_gradients,
    layer_integrated_gradients,
)

__all__ = [
    "direct_logit_attribution", "layer_integrated_gradients", "embedding_integrated_gradients",
    "attention_patterns", "attention_rollout", "attention_flow", "attention_times_gradient", "attribution_patching",
    "DirectLogitAttribution", "ComponentAttribution", "IntegratedGradients", "AttentionGradient",
    "AttributionPatching", "DLARun", "IGRun", "FlowRun", "AttentionGradientRun", "AttributionPatchingRun",
]
