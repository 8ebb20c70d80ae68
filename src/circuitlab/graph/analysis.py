"""`PATH_PATCH`: path patching of every head into chosen receivers, as a registered analysis.

``circuitlab path-patch --receivers 'a9.h*<q>'`` runs `path_patch_sweep` (graph/path_patching.py) on every
token-length group of the task and combines the groups weighted by their number of prompts, so every
prompt counts (docs/METHODS.md, "Path patching"). The receivers' syntax is checked when the options are
built, before the model loads; whether the layers and heads they name exist is checked against the
model's graph before the first forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from circuitlab.analysis import Analysis
from circuitlab.errors import GraphError
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import check_receiver_patterns
from circuitlab.graph.path_patching import (
    Logits,
    MetricFn,
    PathPatchSweep,
    feeding_heads,
    path_patch_sweep,
    resolve_receivers,
)
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE = "path_patching.png"
METHOD = "masked-edge (direct edges sender -> receivers)"


@dataclass(frozen=True)
class PathPatchParams:
    """receivers: receiver pattern(s), e.g. 'a9.h*<q>', 'a9.h1', 'm5', 'logits', comma-separated.
    chunk: senders per batched masked forward pass (memory grows linearly with it)."""

    receivers: str
    chunk: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.receivers, str):
            raise GraphError(f"receivers must be a pattern string such as 'a9.h*<q>', got {self.receivers!r}")
        check_receiver_patterns(self.receivers)
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise GraphError(f"chunk must be a positive integer (senders per forward pass), got {self.chunk!r}")


@dataclass
class PathPatchRun:
    """The sweep over a whole task, as an analysis result: one record per (layer, head) sender."""

    receivers: str
    sweep: PathPatchSweep
    token_lengths: list[int]
    n_prompts: int
    n_edges_graph: int

    def records(self) -> list[dict[str, Any]]:
        return list(self.sweep.records())

    def summary(self) -> dict[str, Any]:
        finite = [r for r in self.sweep.records() if r["normalised"] == r["normalised"]]
        strongest = min(finite, key=lambda r: r["normalised"]) if finite else {}
        return {"receivers": self.receivers, "n_receivers": len(self.sweep.receivers),
                "clean_metric": self.sweep.clean, "corrupt_metric": self.sweep.corrupt,
                "strongest_sender": strongest.get("sender"), "strongest_normalised": strongest.get("normalised"),
                "n_prompts": self.n_prompts, "token_lengths": self.token_lengths,
                "n_edges_graph": self.n_edges_graph, "ablation": "corrupt", "method": METHOD,
                "resolved_receivers": self.sweep.receivers}

    def figures(self) -> dict[str, Figure]:
        from circuitlab.graph.draw import path_patching_figure

        title = f"path patching into {self.receivers}: (patched - clean) / (clean - corrupt)"
        return {FIGURE: path_patching_figure(self.sweep.normalised, title=title)}


def _batch_metric(prepared: PreparedTask, batch: TaskBatch) -> MetricFn:
    """The task's metric for one group's logits [batch, pos, vocab] (or a chunk of patched runs of it)."""
    def metric(logits: Logits) -> Float[torch.Tensor, " batch"]:
        return prepared.metric(logits, batch)
    return metric


def path_patch_task(model: Model, task: Task, params: PathPatchParams) -> PathPatchRun:
    """Every head as the sole sender into `params.receivers`, on every token-length group of `task`,
    combined weighted by group size. One progress bar (with ETA) over all senders of all groups."""
    engine = MaskedEdgeEngine(model)
    receivers = resolve_receivers(engine.graph, params.receivers)  # names checked before any forward pass
    heads = feeding_heads(engine.graph, receivers)
    if not heads:
        raise GraphError(f"no attention head has a direct edge into {params.receivers!r} (only the embeddings "
                         "feed layer 0); choose receivers in a later layer, e.g. 'a1.h*<q>' or 'logits'")
    prepared = task.prepare(model)
    groups = prepared.batches
    description = f"path patching {len(heads)} senders" + (f" x {len(groups)} lengths" if len(groups) > 1 else "")
    with progress_bar(len(heads) * len(groups), description) as advance:
        sweeps = [path_patch_sweep(engine, receivers, batch.clean, batch.corrupt, _batch_metric(prepared, batch),
                                   chunk=params.chunk, advance=advance) for batch in groups]
    combined = PathPatchSweep.weighted_mean(sweeps, [batch.size for batch in groups])
    return PathPatchRun(params.receivers, combined, [batch.n_pos for batch in groups], prepared.n_prompts,
                        engine.graph.n_edges)


def _compute(model: Model, task: Task | None, params: PathPatchParams) -> PathPatchRun:
    assert task is not None  # the entry requires a task
    return path_patch_task(model, task, params)


PATH_PATCH: Analysis[PathPatchParams] = Analysis(
    "path-patch", "every head as sender into chosen receivers (direct edges, corrupt -> clean)",
    PathPatchParams, _compute,
)
