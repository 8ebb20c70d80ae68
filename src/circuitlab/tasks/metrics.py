"""Task metrics: batched, differentiable functions of logits, one value per prompt.

A metric takes `logits [batch, pos, vocab]` and a `TaskBatch` and returns `[batch]`. Averages over a
dataset are taken by the caller (`PreparedTask.mean_metric`), so every gradient method can reuse these.

Named metrics (`logit_diff`, `logprob`, `prob`, `kl`) score answer tokens. `output:K` scores no token: it
is the raw output value of dimension K at the answer position, for models whose output is a number (a
regression read from one output dimension) rather than a next token; such a task needs no answers.
Definitions: docs/METHODS.md, "Tasks and metrics".
"""

from __future__ import annotations

import re
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
OUTPUT_PREFIX = "output:"
_OUTPUT = re.compile(r"^output:([0-9]+)$")  # ASCII digits only: int() would take others


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    def wrap(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return wrap


def get_metric(name: str) -> MetricFn:
    """The metric called `name`: a registered one, or `output:K`; a MetricError naming the choices otherwise.

    Needs no model, so a typo fails before the model loads; `check_output_width` checks K once it has.
    """
    if name in METRICS:
        return METRICS[name]
    dim = output_dim(name)
    if dim is not None:
        return _output_metric(dim)
    raise MetricError(f"unknown metric {name!r}; choose one of {sorted(METRICS)} or output:K (the raw output "
                      "value of dimension K, K a non-negative integer)")


def output_dim(name: str) -> int | None:
    """K for the metric `output:K`, None for any other name; a MetricError when K is not a non-negative int."""
    if not name.startswith(OUTPUT_PREFIX):
        return None
    match = _OUTPUT.match(name)
    if match is None:
        raise MetricError(f"metric {name!r}: write output:K with K a non-negative integer, e.g. output:0")
    return int(match.group(1))


def needs_answers(name: str) -> bool:
    """Whether the metric scores answer tokens (every metric except `output:K`)."""
    return output_dim(name) is None


def check_output_width(name: str, width: int, model_name: str) -> None:
    """MetricError when `output:K` asks for a dimension the model's output (`width` wide) does not have."""
    dim = output_dim(name)
    if dim is not None and dim >= width:
        raise MetricError(f"metric {name!r}: {model_name}'s output has {width} dimensions (0 to {width - 1}); "
                          f"choose K below {width}")


def _output_metric(dim: int) -> MetricFn:
    def output(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
        """The raw output value of dimension `dim` at the answer position (no softmax, no answer set)."""
        check_output_width(f"{OUTPUT_PREFIX}{dim}", logits.shape[-1], "the model")
        return _answer_logits(logits, batch)[:, dim]

    return output


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
