"""Task metrics: batched, differentiable functions of logits, one value per prompt.

A metric takes `logits [batch, pos, vocab]` and a `TaskBatch` and returns `[batch]`. Averages over a
dataset are taken by the caller (`PreparedTask.mean_metric`), so every gradient method can reuse these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float

from circuitlab.errors import MetricError

if TYPE_CHECKING:
    from circuitlab.tasks.task import TaskBatch

MetricFn = Callable[[torch.Tensor, "TaskBatch"], torch.Tensor]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    def wrap(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return wrap


def get_metric(name: str) -> MetricFn:
    if name not in METRICS:
        raise MetricError(f"unknown metric {name!r}; choose one of {sorted(METRICS)}")
    return METRICS[name]


def _answer_logits(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, "batch vocab"]:
    return logits[torch.arange(logits.shape[0]), batch.answer_pos]


def _masked_mean(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of `values[b, ids[b, j]]` over the valid (>= 0) ids of each row."""
    mask = ids >= 0
    picked = values.gather(1, ids.clamp(min=0))
    return (picked * mask).sum(1) / mask.sum(1)


def _masked_logsumexp(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    picked = values.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
    return picked.logsumexp(1)


@register_metric("logit_diff")
def logit_diff(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """Mean logit of the answer set minus mean logit of the wrong set, at the answer position."""
    final = _answer_logits(logits, batch)
    if (batch.wrong < 0).all(1).any():
        raise MetricError("logit_diff needs a wrong answer for every prompt; use metric 'logprob' instead")
    return _masked_mean(final, batch.answers) - _masked_mean(final, batch.wrong)


@register_metric("logprob")
def answer_logprob(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """log P(answer set) at the answer position."""
    return _masked_logsumexp(F.log_softmax(_answer_logits(logits, batch), -1), batch.answers)


@register_metric("prob")
def answer_prob(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """P(answer set) at the answer position."""
    return answer_logprob(logits, batch).exp()


@register_metric("kl")
def kl_to_clean(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """KL(p_clean || p) over the next token at the answer position (0 for the clean run itself)."""
    if batch.reference_logprobs is None:
        raise MetricError("the 'kl' metric needs the clean run's log-probs; call PreparedTask.with_reference(model)")
    logp = F.log_softmax(_answer_logits(logits, batch), -1)
    ref = batch.reference_logprobs
    return (ref.exp() * (ref - logp)).sum(-1)


def normalised(
    value: torch.Tensor | float, clean: torch.Tensor | float, corrupt: torch.Tensor | float, *, eps: float = 1e-6
) -> torch.Tensor:
    """(value - corrupt) / (clean - corrupt): 0 = corrupt behaviour, 1 = clean behaviour.

    `clean` and `corrupt` are dataset means (TransformerLens demos, Wang et al. 2022). A denominator
    below `eps` means the task does not separate clean from corrupt, so normalising is meaningless.
    """
    clean_t, corrupt_t = torch.as_tensor(clean), torch.as_tensor(corrupt)
    denom = clean_t - corrupt_t
    if denom.abs().max() < eps:
        raise MetricError(
            f"normalised metric undefined: clean ({float(clean_t.mean()):.6g}) and corrupt "
            f"({float(corrupt_t.mean()):.6g}) metrics are equal; the corrupt prompts do not change the "
            "behaviour, so choose a different corruption or report the raw metric"
        )
    return (torch.as_tensor(value) - corrupt_t) / denom
