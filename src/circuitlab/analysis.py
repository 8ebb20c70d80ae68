"""`Analysis`: one registry entry per analysis, all with one signature (data, not branches).

Modelled on auto-circuit's registry of prune algorithms: every analysis is a plain record naming its
options (a dataclass whose ``__post_init__`` validates them without a model) and one function::

    compute(model: Model, task: Task | None, params: P) -> AnalysisResult

The runner (`circuitlab.runner.run`) looks the entry up by name, builds and validates `params` from
keyword options *before* the model loads, loads the model, builds the task, calls `compute`, and writes
the run directory. Algorithm modules hold algorithms only; each package's ``analysis.py`` adapts them
to this signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from circuitlab.errors import AnalysisError

if TYPE_CHECKING:  # annotations only: analysis packages import this module, it imports none of them
    from circuitlab.models.model import Model
    from circuitlab.results import AnalysisResult
    from circuitlab.tasks.source import TaskSource
    from circuitlab.tasks.task import Task

P = TypeVar("P")
TaskUse = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class NoParams:
    """For analyses that take no options of their own."""


# ``shard_map(fn, payload)`` -> ``[fn(model, shard, params, payload) for shard in the run's shards]``, in task
# order, computed where the shards run (Ray workers, or this process for a resumable local run) and saved as
# they finish, so `--resume` reuses them. `fn` must be a module-level function (workers import it by name);
# `payload` is tensors, numbers, strings, lists, dicts or dataclasses of them (it is part of each shard's key).
ShardMap = Callable[[Callable[..., Any], Any], list[Any]]


@dataclass(frozen=True)
class ShardSpec(Generic[P]):
    """How an analysis runs on shards of its prompts (``--backend ray``; see docs/METHODS.md,
    "Distributed runs").

    partial: ``partial(model, task_shard, params)`` -> a picklable partial result of those prompts (their
        sums and counts, or their per-prompt values), computed where the shard runs.
    merge: ``merge(model, task, partials, params)`` -> the whole task's `AnalysisResult`, equal to
        `compute` on the whole task up to float summation order; `partials` come in the task's prompt order.
        None when `merge_with_shards` is given (exactly one of the two).
    check: optional; raises a `CircuitlabError` for options under which shards cannot be merged exactly
        (e.g. a mean ablation, whose mean runs over every prompt of a token-length group).
    merge_with_shards: instead of `merge`: ``merge_with_shards(model, task, partials,
        params, shard_map)`` for a merge that needs further passes over the same shards (e.g. the masked
        runs of a faithfulness curve, whose circuits are known only once the merged scores are). See
        `ShardMap`.
    """

    partial: Callable[[Model, Task, P], Any]
    merge: Callable[[Model, Task, list[Any], P], AnalysisResult] | None
    check: Callable[[P], None] | None = None
    merge_with_shards: Callable[[Model, Task, list[Any], P, ShardMap], AnalysisResult] | None = None

    def __post_init__(self) -> None:
        if (self.merge is None) == (self.merge_with_shards is None):
            raise TypeError("a ShardSpec takes exactly one of merge and merge_with_shards")


@dataclass(frozen=True)
class Analysis(Generic[P]):
    """A registered analysis.

    name: what `run` and results.json call it (``"patch"``, ``"attribute/ig"``, ...).
    description: one line for listings and reports.
    params: the options dataclass; building it validates every option (no model needed).
    compute: the analysis itself, ``compute(model, task, params) -> AnalysisResult``.
    task: whether a task is required, optional (e.g. a single ``--prompt`` instead) or never used.
    task_source: optional hook that adjusts the task description to the options before validation
        (e.g. position-wise patching of IOI keeps one template so positions align).
    shard: optional `ShardSpec`: how the analysis splits over prompt shards (None: it runs in one process).
    """

    name: str
    description: str
    params: type[P]
    compute: Callable[[Model, Task | None, P], AnalysisResult]
    task: TaskUse = "required"
    task_source: Callable[[TaskSource, P], TaskSource] | None = None
    shard: ShardSpec[P] | None = None

    def option_names(self) -> set[str]:
        """The names `make_params` accepts."""
        if not is_dataclass(self.params):
            raise TypeError(f"{self.name}: params must be a dataclass")
        return {f.name for f in fields(self.params) if f.init}  # init=False fields are derived, not options

    def make_params(self, options: dict[str, Any]) -> P:
        """The options dataclass from keyword options; unknown names are an `AnalysisError`."""
        if not is_dataclass(self.params):
            raise TypeError(f"{self.name}: params must be a dataclass")
        known = self.option_names()
        unknown = sorted(set(options) - known)
        if unknown:
            raise AnalysisError(f"analysis {self.name!r} takes no option(s) {', '.join(unknown)}; its options are "
                                f"{', '.join(sorted(known)) or 'none'}")
        missing = [f.name for f in fields(self.params) if f.init
                   and f.default is MISSING and f.default_factory is MISSING and f.name not in options]
        if missing:
            raise AnalysisError(f"analysis {self.name!r} needs option(s) {', '.join(missing)}")
        return self.params(**options)

    @staticmethod
    def params_record(params: object) -> dict[str, Any]:
        """The options as plain data, recorded as `params` in results.json."""
        return asdict(params) if is_dataclass(params) and not isinstance(params, type) else {}
