"""`run_patching`: one patching sweep from a model and a task name/path to a saved `Result` + heatmaps.

This is what the `circuitlab patch` command and the demo call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from circuitlab.atomic import write_text_atomically
from circuitlab.models.model import Model
from circuitlab.patching.grid import parse_by
from circuitlab.patching.patcher import ActivationPatcher
from circuitlab.patching.plots import save_heatmaps
from circuitlab.patching.result import PatchingResult
from circuitlab.results import Result
from circuitlab.tasks.registry import make_task
from circuitlab.tasks.task import Task


def run_patching(
    model: Model, task: str | Task = "ioi", *, site: str = "resid_pre", by: str = "layer,pos",
    direction: str = "denoise", n: int | None = None, seed: int = 0, metric: str | None = None,
    max_batch: int = 256, layers: list[int] | None = None, out: str | Path | None = None,
    progress: bool = True, per_prompt: bool = False, task_options: dict[str, Any] | None = None,
) -> tuple[Result, PatchingResult]:
    """Run one sweep; with `out`, write results.json/.csv, patching.json (full per-prompt values) and heatmaps.

    Position-wise sweeps need prompts of one token length: for the built-in IOI task, when `by` has 'pos'
    and no template is chosen, a single template (0) is used so positions align across prompts.
    """
    options = dict(task_options or {})
    axes = parse_by(by)
    if isinstance(task, str):
        if task == "ioi" and "pos" in axes:
            options.setdefault("templates", [0])
        task = make_task(task, model, n=n, seed=seed, metric=metric, **options)
    elif metric:
        task = task.with_metric(metric)
    start = time.perf_counter()
    prepared = task.prepare(model)
    patcher = ActivationPatcher(model, prepared, max_batch=max_batch, progress=progress)
    sweep = patcher.sweep(site, axes, direction, layers=layers)
    elapsed = time.perf_counter() - start
    params = {"site": site, "by": ",".join(axes), "direction": sweep.direction, "n": len(task),
              "metric": task.metric, "max_batch": max_batch, "layers": layers, **options}
    result = Result("patch", model.info(), task.info(), params, sweep.records(per_prompt=per_prompt), seed=seed,
                    timing_s=elapsed, load_s=model.load_s, summary=sweep.summary())
    if out is not None:
        out = Path(out)
        result.artifacts = [str(p.name) for p in save_heatmaps(sweep, out)]
        result.artifacts.append(write_text_atomically(out / "patching.json", sweep.to_json()).name)
        result.save(out)
    return result, sweep
