"""`Executor`: where a run's work happens: in this process (``local``, the default) or sharded over a Ray
cluster (``ray``), resumable, with a result equal to the one-process run.

A sharded run splits the task's prompts into shards (`runner/shards.py`). Each Ray worker is an actor
that loads the model once *by spec* (from its own cache; a bridge is never pickled), sets its torch
threads, and computes the analysis's partial result of one shard at a time (`ShardSpec.partial`: sums and
counts, or per-prompt values). The driver saves each partial as it arrives, and merges them in task order
(`ShardSpec.merge`). A merge that needs more work per prompt once the first pass is merged (the masked runs
of a faithfulness curve over circuits chosen from merged scores: `ShardSpec.merge_with_shards`) runs further
passes over the same shards on the same workers, each saved shard by shard like the first. ``local`` with ``resume=True`` runs the same shards in this process, so an interrupted
local run can resume too. ``--backend local`` without resume is today's run and never imports Ray.

Failures: a worker process that dies is restarted by Ray and its task retried (actor restarts and task
retries); a shard whose computation fails twice fails the run with an error naming its prompts.
See docs/METHODS.md, "Distributed runs".
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitlab.errors import AnalysisError, CircuitlabError
from circuitlab.progress import progress_bar
from circuitlab.runner.shards import ShardStore, payload_digest, prompts_of, shard_key, split_task

if TYPE_CHECKING:
    from circuitlab.analysis import Analysis
    from circuitlab.models.model import Model
    from circuitlab.results import AnalysisResult
    from circuitlab.tasks.task import Task

BACKENDS = ("local", "ray")
ATTEMPTS = 2  # a shard that fails this many times fails the run
FAULTS = ("raise-once", "raise-always", "exit-once")


@dataclass(frozen=True)
class Fault:
    """Test hook: make shard `shard` fail. `kind`: raise-once | raise-always | exit-once (the worker process
    exits, as when a machine dies). "once" is remembered by creating the file `marker`. `stage`: the pass it
    fires in: None for the analysis's own partial (the first pass), else a pass function's "module:name"."""

    kind: str
    shard: int
    marker: str
    stage: str | None = None

    def fire(self, index: int, stage: str | None = None) -> None:
        if index != self.shard or stage != self.stage:
            return
        if self.kind != "raise-always":
            if os.path.exists(self.marker):
                return
            Path(self.marker).touch()
        if self.kind == "exit-once":
            os._exit(1)
        raise RuntimeError(f"injected failure in shard {index}")


@dataclass(frozen=True)
class Executor:
    """Where and how a run computes.

    backend: "local" (this process) or "ray" (prompt shards over Ray workers).
    address: Ray only: None starts a local cluster for this run; "auto" or "HOST:PORT" joins a running one.
    workers: Ray actors, each with its own copy of the model. threads_per_worker: torch threads per actor.
    shard_size: prompts per shard. resume: reuse the finished shards of an interrupted run into the same
    --out (with backend "local" the run is then sharded in this process).
    fault: a test hook (see `Fault`); None in real runs.
    """

    backend: str = "local"
    address: str | None = None
    workers: int = 2
    threads_per_worker: int = 1
    shard_size: int = 8
    resume: bool = False
    fault: Fault | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise AnalysisError(f"unknown backend {self.backend!r}; choose local or ray")
        for name in ("workers", "threads_per_worker", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnalysisError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.address is not None:
            if self.backend != "ray":
                raise AnalysisError("--ray-address needs --backend ray")
            host, _, port = self.address.rpartition(":")
            if self.address != "auto" and not (host and port.isdigit()):
                raise AnalysisError(f"--ray-address must be 'auto' or HOST:PORT, got {self.address!r}")
        if self.fault is not None and self.fault.kind not in FAULTS:
            raise AnalysisError(f"unknown fault {self.fault.kind!r}; choose one of {', '.join(FAULTS)}")

    @property
    def sharded(self) -> bool:
        """Whether runs are split into prompt shards (Ray, or a resumable local run)."""
        return self.backend == "ray" or self.resume

    def check(self, entry: Analysis[Any], params: object, model: object, out: object) -> None:
        """Everything checkable before the model loads: the analysis shards, its options allow it, the model
        is a spec workers can load, resume has a place to resume from; and Ray is installed."""
        if not self.sharded:
            return
        if entry.shard is None:
            from circuitlab.runner.registry import sharded_names

            raise AnalysisError(f"analysis {entry.name!r} does not run sharded (--backend ray / --resume); the "
                                f"ones that do: {', '.join(sharded_names())}. Use --backend local without --resume")
        if entry.shard.check is not None:
            entry.shard.check(params)
        if self.backend == "ray" and not isinstance(model, str):
            raise AnalysisError("--backend ray loads the model in every worker by its spec: pass the model as a "
                                "spec string (name, file, directory or hub id), not a loaded Model")
        if self.resume and out is None:
            raise AnalysisError("--resume needs --out: finished shards are kept beside the run directory")
        if self.backend == "ray":
            try:
                import ray  # noqa: F401
            except ImportError as error:
                raise AnalysisError("--backend ray needs Ray: pip install 'circuitlab[ray]'") from error

    def compute(self, entry: Analysis[Any], spec: str, model: Model, task: Task, params: object,
                store: ShardStore) -> AnalysisResult:
        """The analysis over every shard, merged; finished shards come from `store` when resuming. An analysis
        whose merge needs further passes over the shards (`ShardSpec.merge_with_shards`) gets a `shard_map`
        that runs them where the first pass ran, on the same workers."""
        assert entry.shard is not None  # check() said so
        if not self.resume:
            store.clear()  # stale shards of an earlier run must not mix in
        shards = split_task(task, self.shard_size)
        with self._pool(spec) as pool:
            partials = self.partials(entry, spec, model, shards, params, store, pool=pool)
            if entry.shard.merge_with_shards is not None:
                def shard_map(fn: Callable[..., Any], payload: Any) -> list[Any]:
                    return self.partials(entry, spec, model, shards, params, store, fn=fn, payload=payload,
                                         pool=pool)

                return entry.shard.merge_with_shards(model, task, partials, params, shard_map)
        assert entry.shard.merge is not None  # ShardSpec holds one of the two
        return entry.shard.merge(model, task, partials, params)

    def partials(self, entry: Analysis[Any], spec: str, model: Model | None, shards: list[Task], params: object,
                 store: ShardStore, *, fn: Callable[..., Any] | None = None, payload: Any = None,
                 pool: RayPool | None = None) -> list[Any]:
        """One pass over the shards, in shard order: the analysis's partial of each shard, or with `fn`
        ``fn(model, shard, params, payload)`` (a module-level function: workers import it by name). Each
        result is saved in `store` as it finishes, keyed by the pass too (read back from it when resuming).
        `model` is used by the local backend only; `pool`: the run's Ray workers (None: started for this
        pass)."""
        record = entry.params_record(params)
        stage = None if fn is None else Stage(reference(fn), payload_digest(payload))
        keys = [shard_key(entry.name, spec, record, shard, None if stage is None else (stage.fn, stage.digest))
                for shard in shards]
        partials: dict[int, Any] = {}
        if self.resume:
            for i, key in enumerate(keys):
                found = store.load(i, key)
                if found is not None:
                    partials[i] = found
        todo = [i for i in range(len(shards)) if i not in partials]
        where = f"{self.workers} Ray worker(s)" if self.backend == "ray" else "this process"
        label = entry.name if fn is None else f"{entry.name} {fn.__name__.strip('_')}"
        with progress_bar(len(shards), f"{label}: {len(shards)} shard(s) of {self.shard_size} on {where}") as advance, \
                (nullcontext(pool) if pool is not None else self._pool(spec)) as workers:
            advance(len(partials))
            results = (workers.run(entry.name, shards, todo, params, stage, payload) if workers is not None
                       else self._local(entry, model, shards, todo, params, fn, payload, stage))
            start, prompts = time.perf_counter(), 0
            for i, partial in results:
                store.save(i, keys[i], partial)
                partials[i] = partial
                prompts += len(shards[i])
                advance(1, f"({prompts / max(time.perf_counter() - start, 1e-9):.2f} prompts/s)")
        return [partials[i] for i in range(len(shards))]

    # --- backends -------------------------------------------------------------------------------------
    def _pool(self, spec: str) -> AbstractContextManager[RayPool | None]:
        """The run's Ray workers (started when first needed, stopped on exit); None for the local backend."""
        return RayPool(self, spec) if self.backend == "ray" else nullcontext(None)

    def _local(self, entry: Analysis[Any], model: Model | None, shards: list[Task], todo: list[int],
               params: object, fn: Callable[..., Any] | None, payload: Any,
               stage: Stage | None) -> Iterator[tuple[int, Any]]:
        assert entry.shard is not None and model is not None
        fatal: AnalysisError | None = None
        for i in todo:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    if self.fault is not None and self.fault.kind != "exit-once":
                        self.fault.fire(i, None if stage is None else stage.fn)
                    partial = (entry.shard.partial(model, shards[i], params) if fn is None
                               else fn(model, shards[i], params, payload))
                except CircuitlabError:  # a bad input fails every shard alike: say so now, no retry
                    raise
                except Exception as error:
                    if attempt == ATTEMPTS:
                        fatal = fatal or _failed(i, shards[i], error, stage)
                    continue
                yield i, partial  # saved by the caller, so a resumed run need not redo it
                break
        if fatal is not None:  # raised once every other shard is done and saved
            raise fatal


@dataclass(frozen=True)
class Stage:
    """A pass after the first: its function's "module:name" and its payload's digest (both in shard keys)."""

    fn: str
    digest: str


def reference(fn: Callable[..., Any]) -> str:
    """``"module:qualified.name"`` of a module-level function, by which a worker imports it."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    text = f"{module}:{name}"
    if module is None or "<" in name or _resolve(text) is not fn:
        raise AnalysisError(f"a shard pass needs a module-level function (workers import it by name), got {text}")
    return text


def _resolve(text: str) -> Any:
    import importlib

    module, _, name = text.partition(":")
    try:
        value: Any = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return None
    return value


class RayPool:
    """The Ray workers of one run, shared by its passes: the cluster and the actors start when a pass first
    has shards to compute (a fully resumed run needs none), a dead actor is replaced, and everything stops
    when the run ends."""

    def __init__(self, executor: Executor, spec: str) -> None:
        self.executor, self.spec = executor, spec
        self.actors: list[Any] = []
        self.dead: list[Any] = []
        self.started = False
        self.actor_class: Any = None

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *_: object) -> None:
        if self.actor_class is None:
            return
        import ray

        for actor in self.actors + self.dead:
            ray.kill(actor)
        self.actors, self.dead = [], []
        if self.started:
            ray.shutdown()

    def _start(self) -> None:
        import ray

        executor = self.executor
        self.started = not ray.is_initialized()
        if self.started:
            if executor.address is None:
                ray.init(num_cpus=executor.workers * executor.threads_per_worker, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=executor.address, log_to_driver=False, configure_logging=False)
        remote = ray.remote(num_cpus=executor.threads_per_worker, max_restarts=ATTEMPTS,
                            max_task_retries=ATTEMPTS)
        self.actor_class = remote(ShardWorker)

    def spawn(self) -> Any:
        from ray.actor import ActorHandle

        if self.actor_class is None:
            self._start()
        actor = self.actor_class.remote(self.spec, self.executor.threads_per_worker)
        # ray types .remote() as "handle | the class itself" so editors complete the methods; it is a handle
        assert isinstance(actor, ActorHandle)
        self.actors.append(actor)
        return actor

    def replace(self, actor: Any) -> Any:
        """A new actor for one that died beyond its restarts."""
        self.actors.remove(actor)
        self.dead.append(actor)
        return self.spawn()

    def run(self, name: str, shards: list[Task], todo: list[int], params: object, stage: Stage | None,
            payload: Any) -> Iterator[tuple[int, Any]]:
        """One pass: the shards `todo` over the workers, yielded as they finish."""
        if not todo:  # every shard resumed: no cluster needed
            return
        import ray

        while len(self.actors) < min(self.executor.workers, len(todo)):
            self.spawn()
        fault = self.executor.fault
        work = None if stage is None else (stage.fn, ray.put(payload))  # one copy for every shard
        queue, failures = deque(todo), dict.fromkeys(todo, 0)
        running: dict[Any, tuple[int, Any]] = {}
        fatal: AnalysisError | None = None

        def submit(actor: Any) -> None:
            if queue and fatal is None:  # after a fatal failure, only the running shards finish (and are saved)
                i = queue.popleft()
                args = (name, shards[i], params, i, fault) + (() if work is None else work)
                running[actor.run.remote(*args)] = (i, actor)

        for actor in list(self.actors[:min(self.executor.workers, len(todo))]):
            submit(actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ref)
            try:
                partial = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, CircuitlabError):  # a bad input fails every shard alike: no retry
                    raise cause from None
                failures[i] += 1
                if failures[i] >= ATTEMPTS:
                    fatal = fatal or _failed(i, shards[i], error, stage)
                else:
                    queue.appendleft(i)
                if isinstance(error, ray.exceptions.RayActorError):  # the worker died beyond its restarts
                    actor = self.replace(actor)
                submit(actor)
                continue
            submit(actor)
            yield i, partial
        if fatal is not None:
            raise fatal


def _failed(index: int, shard: Task, error: BaseException, stage: Stage | None = None) -> AnalysisError:
    cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    during = "" if stage is None else f" in the pass {stage.fn}"
    return AnalysisError(f"shard {index} failed {ATTEMPTS} times ({len(shard)} prompt(s): {prompts_of(shard)})"
                         f"{during}: {cause}")


class ShardWorker:
    """A Ray actor (see `Executor._ray`): the model loaded once by spec, then one shard per call."""

    def __init__(self, spec: str, threads: int) -> None:
        import torch

        from circuitlab.models.loading import load_model

        torch.set_num_threads(threads)
        self.model = load_model(spec)

    def run(self, name: str, shard: Task, params: object, index: int, fault: Fault | None,
            fn: str | None = None, payload: Any = None) -> Any:
        """The analysis's partial of `shard`, or with `fn` (a "module:name", see `reference`)
        ``fn(model, shard, params, payload)``."""
        from circuitlab.runner.registry import get_analysis

        if fault is not None:
            fault.fire(index, fn)
        if fn is not None:
            return _resolve(fn)(self.model, shard, params, payload)
        entry = get_analysis(name)
        assert entry.shard is not None
        return entry.shard.partial(self.model, shard, params)

    def ping(self) -> bool:
        """For measuring scheduling overhead (benchmarks/scale.py): a call that does no work."""
        return True
