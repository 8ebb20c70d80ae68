"""Running the bridge for attribution: stop a forward once a hook has fired, and evaluate a metric from
the answer positions' logits only.

Gradient methods run the model on many sequences (IG: steps x prompts) but every task metric reads the
logits of one position per prompt. `metric_with_hooks` stops the bridge's forward at the unembedding's
input (site ``unembed_in``, the final-normed residual stream) and applies the bridge's own `unembed` module to the answer positions
only, so the [sequences, pos, vocab] logits and their gradient are never built. Everything up to the
unembedding is the bridge's forward; tests check the result equals the full-logits metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from circuitlab.errors import AttributionError
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.tasks.task import TaskBatch

MetricFn = Callable[[torch.Tensor, TaskBatch], torch.Tensor]
Hooks = list[tuple[str, Callable]]
UNEMBED_INPUT = hook_name("unembed_in")


class _Stop(Exception):  # noqa: N818 - control flow, not an error: never escapes this module
    """Raised inside a hook to end a forward pass early (the hook context removes the hooks)."""


def check_hook(model: Model, hook: str) -> None:
    """A clear error for a hook name the bridge does not have."""
    if hook not in model.bridge.hook_dict:
        examples = ", ".join(repr(hook_name(*site)) for site in (("embed",), ("resid_pre", 0), ("z", 0)))
        raise AttributionError(f"hook {hook!r} does not exist in {model.spec}; use a name such as {examples} "
                               f"(layers 0..{model.n_layers - 1})")


def capture_activation(model: Model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """The activation at `hook` on `tokens` (no gradient); the forward stops right after the hook."""
    model.check_tokens(tokens)
    check_hook(model, hook)
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, **_) -> None:
        captured["act"] = act.detach()
        raise _Stop

    try:
        with torch.no_grad():
            model.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])
    except _Stop:
        pass
    if "act" not in captured:
        raise AttributionError(f"hook {hook!r} never fires in {model.spec} (is it switched off in the bridge?)")
    return captured["act"]


def metric_with_hooks(model: Model, batch: TaskBatch, metric: MetricFn, fwd_hooks: Hooks) -> torch.Tensor:
    """metric(logits, batch) [batch] for the clean prompts of `batch` run with `fwd_hooks`, unembedding only
    each prompt's answer position (full logits when the batch scores several positions via `targets`)."""
    if batch.targets is not None:
        return metric(model.bridge.run_with_hooks(batch.clean, fwd_hooks=fwd_hooks), batch)
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, **_) -> None:
        captured["resid"] = act
        raise _Stop

    try:
        logits = model.bridge.run_with_hooks(batch.clean, fwd_hooks=[*fwd_hooks, (UNEMBED_INPUT, grab)])
    except _Stop:
        rows = torch.arange(batch.size)
        final = captured["resid"][rows, batch.answer_pos][:, None]  # [batch, 1, d_model]
        logits = model.bridge.unembed(final)
        batch = replace(batch, answer_pos=torch.zeros_like(batch.answer_pos))
    return metric(logits, batch)
