"""`circuitlab grid spec.toml`: one analysis command over a product of tasks, models, methods and seeds.

A spec (TOML, or YAML when PyYAML is installed)::

    models = ["smollm2-135m"]
    tasks = ["ioi", "induction"]          # or a table: [tasks.ioi] templates = [0]  (generator options)
    seeds = [0, 1]                        # default [0]
    n = 8                                 # optional: prompts per task
    metric = "logit_diff"                 # optional: override every task's metric
    [methods.patch]                       # or a list: methods = ["patch", "attribute/dla"]
    site = "z"
    by = "layer,head"
    [methods."attribute/dla"]

Every cell (task x model x method x seed) is checked before anything runs: the analysis name and its
options, the model spec, the task description. Each cell is an ordinary run written into its own folder
under --out (``<method>__<task>__<model>__seed<k>``); ``index.json`` and ``index.html`` list them. A model is
loaded once for all its cells (with ``--backend ray`` every worker loads it by spec instead). With
``resume``, cells whose folder already holds a finished run are kept; the cells' prompt shards resume too.
See docs/METHODS.md, "Distributed runs".
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from circuitlab.atomic import write_text_atomically
from circuitlab.errors import AnalysisError, OutputError
from circuitlab.models.loading import check_spec
from circuitlab.models.model import Model
from circuitlab.results import Result, load_results
from circuitlab.runner.executor import Executor
from circuitlab.runner.registry import get_analysis
from circuitlab.runner.run import Run, _task_source, make_params, run
from circuitlab.runner.rundir import is_run_directory

GRID_SCHEMA = "circuitlab.grid/1"
INDEX_JSON = "index.json"
SPEC_KEYS = ("models", "tasks", "methods", "seeds", "n", "metric")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder under --out and the `run` arguments."""

    folder: str
    method: str
    task: str
    model: str
    seed: int
    options: dict[str, Any]
    task_options: dict[str, Any]


@dataclass(frozen=True)
class GridSpec:
    """A parsed spec: every list non-empty, every method's options a table."""

    models: list[str]
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    n: int | None = None
    metric: str | None = None

    def cells(self) -> list[Cell]:
        out = []
        for model in self.models:  # model outermost: each model is loaded once for its cells
            for task, task_options in self.tasks.items():
                for method, options in self.methods.items():
                    for seed in self.seeds:
                        folder = "__".join((_slug(method, path=False), _slug(task), _slug(model), f"seed{seed}"))
                        out.append(Cell(folder, method, task, model, seed, options, task_options))
        return out


def read_spec(path: str | Path) -> GridSpec:
    """Parse and shape-check a grid spec file (TOML; YAML if PyYAML is installed)."""
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"no grid spec at {path}; write a .toml file (see `circuitlab grid --help`)")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise AnalysisError("YAML grid specs need PyYAML (pip install pyyaml); or write the spec as TOML") from error
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise AnalysisError(f"{path}: not valid YAML: {error}") from error
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise AnalysisError(f"{path}: not valid TOML: {error}") from error
    return parse_spec(data, where=str(path))


def parse_spec(data: object, *, where: str = "grid spec") -> GridSpec:
    if not isinstance(data, dict):
        raise AnalysisError(f"{where}: expected a table of {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise AnalysisError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(SPEC_KEYS)}")
    for key in ("models", "tasks", "methods"):
        if not data.get(key):
            raise AnalysisError(f"{where}: {key!r} must list at least one entry")
    models = data["models"]
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise AnalysisError(f"{where}: 'models' must be a list of model specs")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise AnalysisError(f"{where}: 'seeds' must be a non-empty list of integers")
    n, metric = data.get("n"), data.get("metric")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise AnalysisError(f"{where}: 'n' must be an integer >= 1, got {n!r}")
    if metric is not None and not isinstance(metric, str):
        raise AnalysisError(f"{where}: 'metric' must be a metric name, got {metric!r}")
    return GridSpec(_dedup(models, "models", where), _named_tables(data["tasks"], "tasks", where),
                    _named_tables(data["methods"], "methods", where), _dedup(seeds, "seeds", where), n, metric)


def _named_tables(value: object, key: str, where: str) -> dict[str, dict[str, Any]]:
    """A list of names, or a table of name -> options table."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {name: {} for name in _dedup(value, key, where)}
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return {str(k): dict(v) for k, v in value.items()}
    raise AnalysisError(f"{where}: {key!r} must be a list of names or a table of name -> options")


def _dedup(values: list[Any], key: str, where: str) -> list[Any]:
    if len(set(values)) != len(values):
        raise AnalysisError(f"{where}: {key!r} lists an entry twice")
    return list(values)


def _slug(text: str, *, path: bool = True) -> str:
    """A folder-name part: a file or directory spec by its last component, '/' in method names as '-'."""
    name = Path(text).name if path and "/" in text and Path(text).name else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"


def check_grid(spec: GridSpec, out: Path, *, force: bool, executor: Executor | None) -> list[Cell]:
    """Every check that needs no model, for every cell; the cells in run order."""
    cells = spec.cells()
    folders = [c.folder for c in cells]
    if len(set(folders)) != len(folders):
        raise AnalysisError("two grid cells would share a folder (models or tasks whose names differ only in "
                            "punctuation or directory); rename one")
    for model in spec.models:
        if executor is None or executor.backend != "ray":
            check_spec(model)
    for cell in cells:
        entry = get_analysis(cell.method)
        params = make_params(entry, dict(cell.options), cell.seed)
        cell_executor = _for_cell(executor, cell.method)
        if cell_executor is not None:
            cell_executor.check(entry, params, cell.model, out / cell.folder)
        _task_source(entry, params, cell.task, n=spec.n, seed=cell.seed, metric=spec.metric,
                     task_options=cell.task_options)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an earlier grid" if (out / INDEX_JSON).is_file() else "files that are not a circuitlab grid"
        raise OutputError(f"--out {out} holds {what}; choose another directory, pass --force to replace its "
                          "cells, or --resume to keep the finished ones")
    return cells


def run_grid(spec: GridSpec | str | Path, out: str | Path, *, force: bool = False, resume: bool = False,
             executor: Executor | None = None, on_cell: Callable[[Cell, Result], None] | None = None) -> Path:
    """Run every cell of `spec` into `out` (checked whole first); returns the index.html path.

    force: replace cells that already hold a run. resume: keep cells that already hold a finished run (and
    resume the prompt shards of an interrupted one)."""
    from circuitlab.models.loading import load_model
    from circuitlab.report import write_index

    spec = spec if isinstance(spec, GridSpec) else read_spec(spec)
    out = Path(out)
    if resume and (executor is None or not executor.resume):
        executor = replace(executor or Executor(), resume=True)
    cells = check_grid(spec, out, force=force or resume, executor=executor)
    out.mkdir(parents=True, exist_ok=True)
    done: list[tuple[Cell, Result]] = []
    loaded: dict[str, Model] = {}
    for cell in cells:
        target = out / cell.folder
        if resume and is_run_directory(target):
            result = load_results(target)
        else:
            model: str | Model = cell.model
            if executor is None or executor.backend != "ray":
                if cell.model not in loaded:
                    loaded.clear()  # one model in memory at a time (cells are ordered model-first)
                    loaded[cell.model] = load_model(cell.model)
                model = loaded[cell.model]
            outcome: Run = run(cell.method, model=model, task=cell.task, n=spec.n, seed=cell.seed, metric=spec.metric,
                               task_options=cell.task_options, out=target, force=True,
                               executor=_for_cell(executor, cell.method),
                               **cell.options)
            result = outcome.result
        done.append((cell, result))
        if on_cell is not None:
            on_cell(cell, result)
        _write_index_json(out, done, len(cells))
    steps = [(c.folder, f"{c.method} on {c.task} (seed {c.seed})", r) for c, r in done]
    return write_index(out, steps, title="circuitlab grid")


def _for_cell(executor: Executor | None, method: str) -> Executor | None:
    """A local grid resumes the shards of the analyses that shard and runs the others whole (Ray needs shards)."""
    if executor is not None and executor.backend == "local" and get_analysis(method).shard is None:
        return None
    return executor


def _write_index_json(out: Path, done: list[tuple[Cell, Result]], total: int) -> None:
    data = {"schema": GRID_SCHEMA, "cells": total, "finished": len(done), "runs": [
        {"folder": c.folder, "method": c.method, "task": c.task, "model": c.model, "seed": c.seed,
         "options": c.options, "timing_s": r.timing_s, "summary": r.summary} for c, r in done]}
    write_text_atomically(out / INDEX_JSON, json.dumps(data, indent=1, default=str))
