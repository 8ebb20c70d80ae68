"""`run`: the one verb that runs any analysis, and `save_run`, which writes a run directory.

Order of work (each step only once the previous one passed):

1. look the analysis up and build its options (validated, no model needed); check the model spec (known
   name, readable files, reachable hub) without loading it;
2. describe the task and validate it (name, file, metric, n);
3. check `out` (not a file, writable, empty or a circuitlab run that `force` may replace) and lock it;
4. load the model (timed as `load_s`), build the task;
5. compute (timed as `timing_s`);
6. write results.json, results.csv, the figures, extra files and report.html into a staging directory
   and swap it into place (`RunDirectory`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuitlab.analysis import Analysis
from circuitlab.errors import AnalysisError
from circuitlab.models.loading import check_spec
from circuitlab.models.model import Model
from circuitlab.models.specs import DEFAULT_SPEC
from circuitlab.results import AnalysisResult, Result
from circuitlab.runner.executor import Executor
from circuitlab.runner.registry import get_analysis
from circuitlab.runner.rundir import RunDirectory
from circuitlab.runner.shards import ShardStore, shard_directory
from circuitlab.tasks.source import TaskSource
from circuitlab.tasks.task import Task


@dataclass
class Run:
    """What `run` returns: the saved record, the analysis' own result object, the model and task used."""

    result: Result
    output: AnalysisResult
    model: Model
    task: Task | None
    out: Path | None = None


def make_params(entry: Analysis[Any], options: dict[str, Any], seed: int) -> Any:
    """The analysis' options dataclass; a randomised analysis (one with a seed option, e.g. trace noise)
    gets the run's seed."""
    if "seed" in entry.option_names():
        options = {**options, "seed": seed}
    return entry.make_params(options)


def _task_source(entry: Analysis[Any], params: object, task: str | Task | TaskSource | None, *, n: int | None,
                 seed: int, metric: str | None, task_options: dict[str, Any] | None) -> TaskSource | None:
    if task is None:
        if entry.task == "required":
            raise AnalysisError(f"analysis {entry.name!r} needs a task: a built-in name or a .jsonl/.csv file")
        return None
    if entry.task == "none":
        raise AnalysisError(f"analysis {entry.name!r} takes no task")
    if isinstance(task, TaskSource):
        source = task
    elif isinstance(task, Task):
        source = TaskSource(task=task, n=n, metric=metric)
    else:
        source = TaskSource(name=str(task), n=n, seed=seed, metric=metric, options=dict(task_options or {}))
    if entry.task_source is not None:
        source = entry.task_source(source, params)
    return source.validate()


def run(analysis: str, *, model: str | Model = DEFAULT_SPEC, task: str | Task | TaskSource | None = None,
        n: int | None = None, seed: int = 0, metric: str | None = None,
        task_options: dict[str, Any] | None = None, out: str | Path | None = None, force: bool = False,
        executor: Executor | None = None, **options: Any) -> Run:
    """Run the analysis called `analysis` (see `circuitlab.runner.registry`) and, with `out`, write its
    run directory. `options` are the analysis' own (e.g. ``site="z", by="layer,head"`` for ``"patch"``).

    Every option, the task description and `out` are checked before the model loads; bad input raises a
    `CircuitlabError` naming the fix. `executor` (default: this process) may shard the run over Ray workers
    or make it resumable (see `circuitlab.runner.executor`); the result is the same.
    """
    entry = get_analysis(analysis)
    params = make_params(entry, options, seed)
    if executor is not None:
        executor.check(entry, params, model, out)
    if not isinstance(model, Model):
        check_spec(model)  # file headers, known names, offline hub ids: milliseconds, no torch import
    source = _task_source(entry, params, task, n=n, seed=seed, metric=metric, task_options=task_options)
    rundir = RunDirectory(out, force=force) if out is not None else None
    with rundir if rundir is not None else nullcontext():
        loaded = model if isinstance(model, Model) else _load(model)
        built = source.build(loaded) if source is not None else None
        start = time.perf_counter()
        store = None
        if executor is not None and executor.sharded:
            if built is None:
                raise AnalysisError(f"a sharded run of {entry.name!r} needs a task (its prompts are sharded)")
            store = ShardStore(shard_directory(out) if out is not None else None)
            output = executor.compute(entry, model if isinstance(model, str) else loaded.spec, loaded, built,
                                      params, store)
        else:
            output = entry.compute(loaded, built, params)
        elapsed = time.perf_counter() - start
        record = Result(
            command=entry.name, model=loaded.info(), task=built.info() if built is not None else None,
            params=entry.params_record(params), records=output.records(), seed=seed, timing_s=elapsed,
            load_s=loaded.load_s, summary=output.summary(),
        )
        if rundir is not None:
            save_run(record, output, rundir.path)
    if store is not None:  # the run directory is in place: the finished shards are no longer needed
        store.clear()
    return Run(record, output, loaded, built, Path(out) if out is not None else None)


def _load(spec: str) -> Model:
    from circuitlab.models.loading import load_model

    return load_model(spec)


def save_run(result: Result, output: AnalysisResult, directory: str | Path) -> Path:
    """Write one run into `directory` (a staging directory: the caller makes it whole or absent):
    figures, extra files, results.json, results.csv and report.html. Returns the report's path."""
    from circuitlab.report import write_report
    from circuitlab.report.figure_data import SUFFIX as HEATMAP_SUFFIX
    from circuitlab.report.figure_data import heatmaps_of
    from circuitlab.report.figure_data import to_json as heatmaps_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for name, figure in output.figures().items():
        figure.savefig(directory / name, format=Path(name).suffix.lstrip(".") or "png")
        artifacts.append(name)
        heatmaps = heatmaps_of(figure)  # the numbers behind a heatmap, for the report's hover values
        if heatmaps:
            sidecar = Path(name).stem + HEATMAP_SUFFIX
            (directory / sidecar).write_text(heatmaps_json(heatmaps), encoding="utf-8")
            artifacts.append(sidecar)
    files = getattr(output, "files", None)
    for name, text in (files() if callable(files) else {}).items():
        (directory / name).write_text(text, encoding="utf-8")
        artifacts.append(name)
    result.artifacts = artifacts
    result.save(directory)
    return write_report(result, directory)
