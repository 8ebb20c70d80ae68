"""Attribution methods: direct logit attribution, integrated gradients, attention rollout / flow,
attention x gradient and attribution patching (see METHODS.md for the definitions)."""

from circuitlab.attribution.attention_flow import (
    attention_flow,
    attention_patterns,
    attention_rollout,
    flow_graph,
    residual_attention,
)
from circuitlab.attribution.attention_gradient import AttentionGradient, attention_times_gradient
from circuitlab.attribution.attribution_patching import SITES, AttributionPatching, attribution_patching
from circuitlab.attribution.dla import (
    DirectLogitAttribution,
    answer_direction,
    direct_logit_attribution,
    head_output_weights,
)
from circuitlab.attribution.forward import capture_activation, metric_with_hooks
from circuitlab.attribution.integrated_gradients import (
    IntegratedGradients,
    embedding_integrated_gradients,
    layer_integrated_gradients,
)
from circuitlab.attribution.quadrature import RULES, quadrature
from circuitlab.attribution.run import METHODS, prompt_task, run_attribution

__all__ = [
    "attention_flow", "attention_patterns", "attention_rollout", "flow_graph", "residual_attention",
    "AttentionGradient", "attention_times_gradient", "SITES", "AttributionPatching", "attribution_patching",
    "DirectLogitAttribution", "answer_direction", "direct_logit_attribution", "head_output_weights",
    "IntegratedGradients", "embedding_integrated_gradients", "layer_integrated_gradients", "RULES", "quadrature",
    "METHODS", "prompt_task", "run_attribution", "capture_activation", "metric_with_hooks",
]
