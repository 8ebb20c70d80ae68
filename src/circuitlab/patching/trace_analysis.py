"""`TRACE` and `TRACE_AVERAGE`: ROME causal tracing as registered analyses (``circuitlab trace``).

- ``"trace"``: one prompt, its subject and target token; a (token x layer) grid of indirect effects per kind.
- ``"trace/average"``: a task whose examples name their subject (the built-in ``facts``); the average
  indirect effect over prompts by ROME's token groups.

`kind` is "resid", "mlp", "attn" or "all" (the three). `noise` is "subject" (ROME's: `noise_scale` x the std
of the subject tokens' embeddings, over the task's subjects for an average and over the one subject for a
single prompt), "vocab" (`noise_scale` x the std over the whole vocabulary) or a number (sigma itself); the
summary records the sigma used and how it was derived. `aggregate` ("token", ROME's notebook, or "prompt")
says how an average pools the tokens of a group. Every option, and whether the subject occurs in the
prompt, is checked before the model loads. The noise is drawn from the run's seed (prompt i of a task uses
seed + i). See docs/METHODS.md, "Causal tracing".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from circuitlab.analysis import Analysis
from circuitlab.errors import CausalTraceError
from circuitlab.models.model import Model
from circuitlab.patching.causal_trace import (
    KINDS,
    ROME_NOISE_SCALE,
    AverageTrace,
    CausalTracer,
    TraceGrid,
    average_indirect_effect,
    check_aggregate,
    check_noise,
    facts_from_task,
)
from circuitlab.patching.plots import plot_average, plot_trace
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KIND_CHOICES: tuple[str, ...] = (*KINDS, "all")


def _check_tracing_options(kind: str, samples: int, noise: str | float, noise_scale: float, window: int) -> str | float:
    """Every tracing option checked; returns `noise` canonical ('subject', 'vocab' or a float)."""
    if kind not in KIND_CHOICES:
        raise CausalTraceError(f"unknown trace kind {kind!r}; choose one of {', '.join(KIND_CHOICES)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CausalTraceError(f"samples must be an integer >= 1 (noise draws per run), got {samples!r}")
    noise = check_noise(noise, noise_scale)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise CausalTraceError(f"window must be an integer >= 1 (layers restored together for mlp / attn), got "
                               f"{window!r}")
    return noise


def _kinds(kind: str) -> list[str]:
    return list(KINDS) if kind == "all" else [kind]


@dataclass(frozen=True)
class TraceParams:
    """Options of a single-prompt trace; `subject` must occur in `prompt` as written, `target` is one token."""

    prompt: str
    subject: str
    target: str
    kind: str = "all"
    samples: int = 10
    noise: str | float = "subject"  # "subject" (ROME), "vocab" or sigma itself
    noise_scale: float = ROME_NOISE_SCALE  # multiplies the std of "subject" / "vocab"
    window: int = 10
    seed: int = 0  # the run's seed (set by the runner): draws the noise

    def __post_init__(self) -> None:
        noise = _check_tracing_options(self.kind, self.samples, self.noise, self.noise_scale, self.window)
        object.__setattr__(self, "noise", noise)
        if not self.prompt or not self.prompt.strip():
            raise CausalTraceError("the prompt is empty; pass the prompt to trace with --prompt")
        if not self.subject or not self.subject.strip():
            raise CausalTraceError("the subject is empty; pass the subject string as it appears in the prompt")
        if self.subject not in self.prompt:
            raise CausalTraceError(f"subject {self.subject!r} does not occur in the prompt {self.prompt!r}; pass the "
                                   "subject exactly as it is written in the prompt (same case and spacing)")
        if not self.target:
            raise CausalTraceError("the target is empty; pass the expected next token, e.g. --target ' Paris'")


@dataclass(frozen=True)
class AverageTraceParams:
    """Options of an average trace over a task whose examples name their subject."""

    kind: str = "all"
    samples: int = 10
    noise: str | float = "subject"  # "subject" (ROME: over the task's subjects), "vocab" or sigma itself
    noise_scale: float = ROME_NOISE_SCALE
    window: int = 10
    aggregate: str = "token"  # ROME's notebook pools tokens; "prompt" averages each prompt first
    seed: int = 0  # the run's seed (set by the runner): prompt i draws its noise with seed + i

    def __post_init__(self) -> None:
        noise = _check_tracing_options(self.kind, self.samples, self.noise, self.noise_scale, self.window)
        object.__setattr__(self, "noise", noise)
        check_aggregate(self.aggregate)


@dataclass
class TraceOutput:
    """One prompt's grids, one per kind, as an analysis result (trace_{kind}.png per kind)."""

    tracer: CausalTracer
    grids: dict[str, TraceGrid]

    def records(self) -> list[dict[str, Any]]:
        return [row for grid in self.grids.values() for row in grid.records()]

    def summary(self) -> dict[str, Any]:
        t = self.tracer
        out: dict[str, Any] = {"clean_prob": t.clean_prob, "corrupt_prob": t.corrupt_prob,
                               "subject_tokens": t.str_tokens[slice(*t.subject_span)],
                               "subject_span": list(t.subject_span), **t.noise.summary()}
        for grid in self.grids.values():
            out.update(grid.summary())
        return out

    def figures(self) -> dict[str, Figure]:
        return {f"trace_{kind}.png": plot_trace(grid) for kind, grid in self.grids.items()}


@dataclass
class AverageTraceOutput:
    """Average indirect effects, one per kind, as an analysis result (aie_{kind}.png per kind)."""

    averages: dict[str, AverageTrace]

    def records(self) -> list[dict[str, Any]]:
        return [row for avg in self.averages.values() for row in avg.records()]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for avg in self.averages.values():
            out.update(avg.summary())
        return out

    def figures(self) -> dict[str, Figure]:
        return {f"aie_{kind}.png": plot_average(avg) for kind, avg in self.averages.items()}


def _trace(model: Model, task: Task | None, params: TraceParams) -> TraceOutput:
    tracer = CausalTracer(model, params.prompt, params.subject, params.target, noise=params.noise,
                          noise_scale=params.noise_scale, samples=params.samples, seed=params.seed)
    kinds = _kinds(params.kind)
    grids = {}
    with progress_bar(len(kinds) * tracer.n_pos * model.n_layers, "causal tracing") as advance:
        for kind in kinds:
            grids[kind] = tracer.trace(kind, params.window, advance=advance)
    return TraceOutput(tracer, grids)


def _trace_average(model: Model, task: Task | None, params: AverageTraceParams) -> AverageTraceOutput:
    assert task is not None  # the entry requires a task
    facts = facts_from_task(task)
    kinds = _kinds(params.kind)
    with progress_bar(len(facts) * len(kinds), f"causal tracing {len(facts)} prompts") as advance:
        averages = average_indirect_effect(model, facts, kinds, window=params.window, noise=params.noise,
                                           noise_scale=params.noise_scale, aggregate=params.aggregate,
                                           samples=params.samples, seed=params.seed, advance=advance)
    return AverageTraceOutput(averages)


TRACE = Analysis("trace", "ROME causal tracing of one prompt: indirect effect of each restored (token, layer)",
                 TraceParams, _trace, task="none")
TRACE_AVERAGE = Analysis("trace/average", "ROME causal tracing averaged over a task's prompts by token group",
                         AverageTraceParams, _trace_average, task="required")
