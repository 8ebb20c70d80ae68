"""`PATH_PATCH`: path patching of every head into chosen receivers, as a registered analysis.

``circuitlab path-patch --receivers 'a9.h*<q>'`` runs `path_patch_sweep` (graph/path_patching.py) on every
token-length group of the task and combines the groups weighted by their number of prompts, so every
prompt counts (docs/METHODS.md, "Path patching"); the same combination merges prompt shards
(``--backend ray`` / ``--resume``: `path_patch_part` per shard, `combine_parts` in the driver; see
docs/METHODS.md, "Distributed runs"). method 'auto' takes the fast paths, which equal the masked-edge
run up to float32 rounding: receivers 'logits' -> `direct_logit_sweep` (graph/direct_paths.py:
two forwards, then one final norm + unembedding per sender at the scored positions; the input and every
MLP are senders too), any other receivers -> `restart_sweep` (graph/restart.py: blocks from the earliest
receiver layer on, `max_batch` rows per forward). method 'masked' runs one masked-edge forward per sender
(`chunk` senders per forward), the reference. The receivers' syntax is checked when the options are
built, before the model loads; whether the layers and heads they name exist is checked against the
model's graph before the first forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from circuitlab.analysis import Analysis, ShardSpec
from circuitlab.errors import GraphError
from circuitlab.graph.direct_paths import Positions, Readout, SenderSweep, direct_logit_sweep, masked_sweep
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import check_receiver_patterns, head_name
from circuitlab.graph.path_patching import (
    Logits,
    MetricFn,
    PathPatchSweep,
    feeding_heads,
    resolve_receivers,
)
from circuitlab.graph.restart import restart_sweep
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar
from circuitlab.tasks.task import PreparedTask, Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE = "path_patching.png"
METHOD = "masked-edge (direct edges sender -> receivers)"
METHODS = ("auto", "masked")
FAST_METHODS = {"logits": "direct path (final norm + unembedding per sender, two forwards)",
                "restart": "restart at the earliest receiver layer (masked-edge rule, senders stacked)"}


@dataclass(frozen=True)
class PathPatchParams:
    """receivers: receiver pattern(s), e.g. 'a9.h*<q>', 'a9.h1', 'm5', 'logits', comma-separated.
    chunk: senders per batched masked forward pass (method 'masked'; memory grows linearly with it).
    method: 'auto' (the fast paths, equal to the masked run up to float32 rounding) or 'masked' (one
    masked-edge forward per sender: the reference). max_batch: rows (senders x prompts) per batched
    step of the fast paths (the memory budget)."""

    receivers: str
    chunk: int = 16
    method: str = "auto"
    max_batch: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.receivers, str):
            raise GraphError(f"receivers must be a pattern string such as 'a9.h*<q>', got {self.receivers!r}")
        check_receiver_patterns(self.receivers)
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise GraphError(f"chunk must be a positive integer (senders per forward pass), got {self.chunk!r}")
        if self.method not in METHODS:
            raise GraphError(f"unknown path-patching method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise GraphError(f"max_batch must be a positive integer (rows per batched step), got {self.max_batch!r}")


@dataclass
class PathPatchRun:
    """The sweep over a whole task, as an analysis result: one record per (layer, head) sender."""

    receivers: str
    sweep: PathPatchSweep
    token_lengths: list[int]
    n_prompts: int
    n_edges_graph: int
    method: str = METHOD

    def records(self) -> list[dict[str, Any]]:
        return list(self.sweep.records())

    def summary(self) -> dict[str, Any]:
        finite = [r for r in self.sweep.records() if r["normalised"] == r["normalised"]]
        strongest = min(finite, key=lambda r: r["normalised"]) if finite else {}
        return {"receivers": self.receivers, "n_receivers": len(self.sweep.receivers),
                "clean_metric": self.sweep.clean, "corrupt_metric": self.sweep.corrupt,
                "strongest_sender": strongest.get("sender"), "strongest_normalised": strongest.get("normalised"),
                "n_prompts": self.n_prompts, "token_lengths": self.token_lengths,
                "n_edges_graph": self.n_edges_graph, "ablation": "corrupt", "method": self.method,
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


def _readout(prepared: PreparedTask, batch: TaskBatch) -> tuple[Positions, torch.Tensor | None, Readout]:
    """The task's metric as the fast paths read it: the positions it scores (the answer position, or
    every position for per-position targets), the vocabulary columns it reads (the answer and wrong
    tokens for logit_diff; None = all), and the metric of logits [batch, n_read, n_columns]."""
    if batch.targets is None:
        positions = batch.answer_pos.unsqueeze(1)
        local = replace(batch, answer_pos=torch.zeros_like(batch.answer_pos))
    else:
        positions = torch.arange(batch.n_pos).expand(batch.size, -1)
        local = batch
    columns = None
    if prepared.metric_name == "logit_diff":
        ids = torch.cat([batch.answers.flatten(), batch.wrong.flatten()])
        columns = torch.unique(ids[ids >= 0])

        def remap(t: torch.Tensor) -> torch.Tensor:
            return torch.where(t >= 0, torch.searchsorted(columns, t.clamp(min=0)), t)
        local = replace(local, answers=remap(local.answers), wrong=remap(local.wrong))

    def readout(logits: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        return prepared.metric(logits, local)
    return positions, columns, readout


def _group_sweep(model: Model, engine: MaskedEdgeEngine | None, graph: Graph, receivers: list[str],
                 senders: list[str], prepared: PreparedTask, batch: TaskBatch, params: PathPatchParams,
                 advance: Callable[[float], None]) -> PathPatchSweep:
    """One token-length group by the chosen method (see the module docstring)."""
    if engine is None:  # logits only: the direct path needs no masked-edge engine
        positions, columns, readout = _readout(prepared, batch)
        return direct_logit_sweep(model, batch.clean, batch.corrupt, readout, positions, columns=columns,
                                  senders=senders, max_batch=params.max_batch, graph=graph, advance=advance)
    if params.method == "masked":
        return masked_sweep(engine, receivers, batch.clean, batch.corrupt, _batch_metric(prepared, batch), senders,
                            chunk=params.chunk, advance=advance)
    positions, columns, readout = _readout(prepared, batch)
    return restart_sweep(engine, receivers, batch.clean, batch.corrupt, readout, positions, senders,
                         columns=columns, max_batch=params.max_batch, advance=advance)


@dataclass
class PathPatchPart:
    """Path patching of some prompts (a task, or a prompt shard of one) before combining: one sweep per
    token-length group (`sweeps`, means over the group's prompts), the groups' prompt counts (`sizes`) and
    (clean, corrupt) token lengths (`keys`, as `PreparedTask.build` groups prompts)."""

    sweeps: list[PathPatchSweep]
    sizes: list[int]
    keys: list[tuple[int, int]]
    n_edges_graph: int
    method: str


def path_patch_part(model: Model, task: Task, params: PathPatchParams) -> PathPatchPart:
    """Every head (with receivers 'logits': every sender) as the sole sender into `params.receivers`, on
    every token-length group of `task`, each group on its own. One progress bar (with ETA) over all
    senders of all groups."""
    graph = Graph.from_model(model)
    receivers = resolve_receivers(graph, params.receivers)  # names checked before any forward pass
    heads = feeding_heads(graph, receivers)
    if not heads:
        raise GraphError(f"no attention head has a direct edge into {params.receivers!r} (only the embeddings "
                         "feed layer 0); choose receivers in a later layer, e.g. 'a1.h*<q>' or 'logits'")
    direct = receivers == ["logits"] and params.method == "auto"
    senders = graph.senders if receivers == ["logits"] else [head_name(*lh) for lh in heads]
    engine = None if direct else MaskedEdgeEngine(model, graph)
    method = METHOD if params.method == "masked" else FAST_METHODS["logits" if direct else "restart"]
    prepared = task.prepare(model)
    groups = prepared.batches
    description = f"path patching {len(senders)} senders" + (f" x {len(groups)} lengths" if len(groups) > 1 else "")
    with progress_bar(len(senders) * len(groups), description) as advance:
        sweeps = [_group_sweep(model, engine, graph, receivers, senders, prepared, batch, params, advance)
                  for batch in groups]
    return PathPatchPart(sweeps, [batch.size for batch in groups],
                         [(batch.n_pos, int(batch.corrupt.shape[1])) for batch in groups], graph.n_edges, method)


def combine_parts(parts: list[PathPatchPart], params: PathPatchParams) -> PathPatchRun:
    """Parts (prompt shards in task order, or one whole task) as one run: every group's sweep weighted by
    its number of prompts, i.e. the mean over all prompts; the normalisation by the whole task's clean and
    corrupt means comes after (`PathPatchSweep.normalised`), so shards merge exactly."""
    sweeps = [sweep for part in parts for sweep in part.sweeps]
    sizes = [size for part in parts for size in part.sizes]
    keys = sorted({key for part in parts for key in part.keys})  # the whole task's groups, in its order
    return PathPatchRun(params.receivers, SenderSweep.weighted_mean(sweeps, sizes), [n_pos for n_pos, _ in keys],
                        sum(sizes), parts[0].n_edges_graph, parts[0].method)


def path_patch_task(model: Model, task: Task, params: PathPatchParams) -> PathPatchRun:
    """Every head (with receivers 'logits': every sender) as the sole sender into `params.receivers`, on
    every token-length group of `task`, combined weighted by group size."""
    return combine_parts([path_patch_part(model, task, params)], params)


def _compute(model: Model, task: Task | None, params: PathPatchParams) -> PathPatchRun:
    assert task is not None  # the entry requires a task
    return path_patch_task(model, task, params)


def _merge(model: Model, task: Task, partials: list[PathPatchPart], params: PathPatchParams) -> PathPatchRun:
    return combine_parts(partials, params)


PATH_PATCH: Analysis[PathPatchParams] = Analysis(
    "path-patch", "every head as sender into chosen receivers (direct edges, corrupt -> clean)",
    PathPatchParams, _compute, shard=ShardSpec(path_patch_part, _merge),
)
