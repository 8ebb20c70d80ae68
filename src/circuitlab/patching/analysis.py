"""`PATCH`: activation patching as a registered analysis (``circuitlab patch``, ``run("patch", ...)``).

The options are checked without a model (site, granularity, direction, batch budget), so a typo fails
before the model loads. Position-wise sweeps need prompts of one token length: for the built-in IOI task,
a sweep over positions uses one template (0) unless the templates were chosen explicitly.
See docs/METHODS.md, "Activation patching".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from circuitlab.analysis import Analysis, ShardSpec
from circuitlab.errors import PatchingError
from circuitlab.models.model import Model
from circuitlab.patching.grid import check_heads, parse_by
from circuitlab.patching.patcher import ActivationPatcher, check_direction
from circuitlab.patching.plots import patching_figures
from circuitlab.patching.result import PatchingResult
from circuitlab.patching.sites import check_site_name
from circuitlab.tasks.source import TaskSource
from circuitlab.tasks.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class PatchParams:
    """Options of one patching sweep.

    site: a patchable site (resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern).
    by: the granularity, "layer,pos" | "layer" | "layer,head" | "layer,head,pos" (stored canonical).
    direction: "denoise" (clean into corrupt) or "noise" (corrupt into clean) (stored canonical).
    max_batch: patched rows per forward pass (the memory budget).
    per_prompt: one record per cell and prompt instead of one per cell.
    layers: restrict the sweep to these layers (all by default).
    """

    site: str = "resid_pre"
    by: str = "layer,pos"
    direction: str = "denoise"
    max_batch: int = 256
    per_prompt: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        site = check_site_name(self.site)
        axes = parse_by(self.by)
        check_heads(axes, site)
        object.__setattr__(self, "by", ",".join(axes))
        object.__setattr__(self, "direction", check_direction(self.direction))
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise PatchingError(f"max_batch must be an integer >= 1 (patched rows per forward pass), got "
                                f"{self.max_batch!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise PatchingError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @property
    def axes(self) -> tuple[str, ...]:
        return parse_by(self.by)


@dataclass
class PatchOutput:
    """A sweep as an analysis result: records (per cell, or per cell and prompt), heatmaps, patching.json."""

    sweep: PatchingResult
    per_prompt: bool = False

    def records(self) -> list[dict[str, Any]]:
        return self.sweep.records(per_prompt=self.per_prompt)

    def summary(self) -> dict[str, Any]:
        return self.sweep.summary()

    def figures(self) -> dict[str, Figure]:
        return patching_figures(self.sweep)

    def files(self) -> dict[str, str]:
        """patching.json: every per-prompt value, readable back with `PatchingResult.from_json`."""
        return {"patching.json": self.sweep.to_json()}


def _patch(model: Model, task: Task | None, params: PatchParams) -> PatchOutput:
    assert task is not None  # the entry requires a task
    patcher = ActivationPatcher(model, task.prepare(model), max_batch=params.max_batch)
    layers = list(params.layers) if params.layers is not None else None
    return PatchOutput(patcher.sweep(params.site, params.axes, params.direction, layers=layers), params.per_prompt)


def _aligned_ioi(source: TaskSource, params: PatchParams) -> TaskSource:
    """IOI's templates differ in length; a sweep over positions keeps template 0 unless templates were given."""
    if source.name == "ioi" and "pos" in params.axes and "templates" not in source.options:
        return replace(source, options={**source.options, "templates": [0]})
    return source


def _merge(model: Model, task: Task, partials: list[PatchOutput], params: PatchParams) -> PatchOutput:
    """Prompt shards of one sweep: their per-prompt values side by side in task order (a shard's prompts
    are consecutive), so every mean, normalised effect and per-prompt row equals the one-process sweep."""
    sweeps = [p.sweep for p in partials]
    first = sweeps[0]
    if any(s.cells != first.cells for s in sweeps):
        raise PatchingError("the prompt shards swept different cells (prompts of different token lengths in a "
                            "sweep over positions); give prompts of one token length")
    stats = {key: sum(s.stats[key] for s in sweeps) if isinstance(value, int | float) else value
             for key, value in first.stats.items()}
    merged = replace(first, values=torch.cat([s.values for s in sweeps], 1), clean=torch.cat([s.clean for s in sweeps]),
                     corrupt=torch.cat([s.corrupt for s in sweeps]), timing_s=sum(s.timing_s for s in sweeps),
                     stats=stats)
    return PatchOutput(merged, params.per_prompt)


PATCH = Analysis("patch", "activation patching sweep: normalised effect per site, layer, position and head",
                 PatchParams, _patch, task="required", task_source=_aligned_ioi, shard=ShardSpec(_patch, _merge))
