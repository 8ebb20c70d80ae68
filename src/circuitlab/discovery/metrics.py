"""Metrics for circuit discovery: the task's own metric, or a distance to the full model's output.

Every metric maps logits [batch, pos, vocab] to one value per prompt [batch] and is differentiable, so the
gradient methods (EAP, EAP-IG) and the exact masked runs use the same function:

- a task metric (``logit_diff``, ``logprob``, ``prob``, ...) reads the answer position and needs answers;
- ``kl``: KL(full || circuit) = sum_v p_full(v) (log p_full(v) - log p_circuit(v)) over the next-token
  distribution, 0 for the full model itself;
- ``l2``: ||out_circuit - out_full||^2, the squared distance between the two output vectors (for models
  whose output is a number, or to compare raw logits).

``kl`` and ``l2`` compare against the full model's clean logits (the *reference*), so they need no answers.
`positions` = ``last`` reads the answer position (the last token unless the task says otherwise);
``all`` averages over every position. See docs/METHODS.md, "Circuit discovery".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float

from circuitlab.errors import DiscoveryError, MetricError
from circuitlab.tasks.metrics import get_metric
from circuitlab.tasks.task import PreparedTask, TaskBatch

DISTANCE_METRICS = ("kl", "l2")
POSITIONS = ("last", "all")

Logits = Float[torch.Tensor, "batch pos vocab"]
PerPrompt = Float[torch.Tensor, " batch"]


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise DiscoveryError(f"unknown positions {positions!r}; choose 'last' (the answer position) or 'all'")
    return positions


def check_metric_name(metric: str | None, positions: str = "last") -> str | None:
    """Validate a metric name without a model: a distance metric, or a registered task metric."""
    check_positions(positions)
    if metric is None:
        return None
    if metric not in DISTANCE_METRICS:
        try:
            get_metric(metric)
        except MetricError as exc:
            raise DiscoveryError(f"unknown metric {metric!r}; choose kl, l2 or a task metric ({exc})") from None
        if positions == "all":
            raise DiscoveryError(f"metric {metric!r} reads the answer position only; --positions all needs kl or l2")
    return metric


@dataclass(frozen=True)
class DiscoveryMetric:
    """One metric as discovery uses it: `metric(logits, batch, reference) -> [batch]`.

    reference: the full model's clean logits [batch, pos, vocab] (only `kl` / `l2` read it).
    higher_is_better: False for distances (0 = the full model); the faithfulness curve normalises either way.
    """

    name: str
    positions: str
    fn: Callable[[Logits, TaskBatch, Logits | None], PerPrompt]

    @property
    def needs_reference(self) -> bool:
        return self.name in DISTANCE_METRICS

    @property
    def higher_is_better(self) -> bool:
        return self.name not in DISTANCE_METRICS

    def __call__(self, logits: Logits, batch: TaskBatch, reference: Logits | None = None) -> PerPrompt:
        if self.needs_reference and reference is None:
            raise DiscoveryError(f"metric {self.name!r} needs the full model's logits as its reference")
        return self.fn(logits, batch, reference)


def discovery_metric(prepared: PreparedTask, metric: str | None = None, positions: str = "last") -> DiscoveryMetric:
    """The metric called `metric` (the task's own when None) read at `positions`."""
    name = check_metric_name(metric, positions) or prepared.metric_name
    if name in DISTANCE_METRICS:
        distance = _kl if name == "kl" else _l2
        return DiscoveryMetric(name, positions, lambda logits, batch, ref: _at_positions(
            distance(logits, ref), batch, positions))  # type: ignore[arg-type]
    check_metric_name(name, positions)
    task_metric = get_metric(name)
    return DiscoveryMetric(name, positions, lambda logits, batch, ref: task_metric(logits, batch))


def _kl(logits: Logits, reference: Logits) -> Float[torch.Tensor, "batch pos"]:
    """KL(full || circuit) at every position."""
    logp = F.log_softmax(logits, -1)
    ref = F.log_softmax(reference, -1)
    return (ref.exp() * (ref - logp)).sum(-1)


def _l2(logits: Logits, reference: Logits) -> Float[torch.Tensor, "batch pos"]:
    return (logits - reference).pow(2).sum(-1)


def _at_positions(values: Float[torch.Tensor, "batch pos"], batch: TaskBatch, positions: str) -> PerPrompt:
    if positions == "all":
        return values.mean(-1)
    return values[torch.arange(values.shape[0]), batch.answer_pos]
