"""Attention x gradient (docs/METHODS.md, "Attention x gradient"): each head's attention pattern times the
gradient of the metric with respect to that pattern (the ``pattern`` site), a first-order estimate of what
each attention edge does.

The gradient is taken of the real forward: patterns are intermediate tensors of one run, so the gradient
of layer l's pattern includes every later path (values, queries and keys of later layers). Gradients
start from the embeddings (made differentiable at the ``embed`` site), never from the integer tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float

from circuitlab.attribution.forward import MetricFn, metric_with_hooks
from circuitlab.models.hooks import hook_name, layer_hook_names
from circuitlab.models.model import Model
from circuitlab.tasks.task import TaskBatch


@dataclass
class AttentionGradient:
    """scores: [batch, layer, head, q, k] = A * d metric / d A; head_scores: [layer, head] (sum over q, k,
    mean over prompts)."""

    scores: Float[torch.Tensor, "batch layer head q k"]

    @property
    def head_scores(self) -> Float[torch.Tensor, "layer head"]:
        return self.scores.sum((-1, -2)).mean(0)

    @property
    def prompt_head_scores(self) -> Float[torch.Tensor, "batch layer head"]:
        """Each prompt's score per head (sum over q, k)."""
        return self.scores.sum((-1, -2))

    def records(self) -> list[dict]:
        heads = self.head_scores
        return [{"layer": layer, "head": head, "value": float(heads[layer, head])}
                for layer in range(heads.shape[0]) for head in range(heads.shape[1])]


def attention_times_gradient(model: Model, batch: TaskBatch, metric: MetricFn) -> AttentionGradient:
    """A * dm_b/dA for every head and clean prompt b of `batch` (prompts are independent, so one backward of
    the summed metric gives every prompt's own gradient)."""
    model.check_tokens(batch.clean)
    patterns: dict[int, torch.Tensor] = {}

    def differentiable(act: torch.Tensor, hook=None) -> torch.Tensor:
        # Embeddings as the leaf of the graph, whether or not the weights require grad.
        return act.detach().requires_grad_(True)

    def keep(layer: int) -> Callable:
        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
            patterns[layer] = act
            return act

        return hook

    hooks = [(hook_name("embed"), differentiable)]
    hooks += [(name, keep(layer)) for layer, name in enumerate(layer_hook_names("pattern", model.n_layers))]
    with torch.enable_grad():
        value = metric_with_hooks(model, batch, metric, hooks).sum()
        ordered = [patterns[layer] for layer in range(model.n_layers)]
        grads = torch.autograd.grad(value, ordered)
    scores = torch.stack([(a * g).detach() for a, g in zip(ordered, grads, strict=True)], 1)
    return AttentionGradient(scores)
