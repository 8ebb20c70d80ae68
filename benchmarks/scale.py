"""What sharding over Ray costs and what a cluster would give: EAP-IG edge scores of IOI prompts on SmolLM2-135M.

Run: CIRCUITLAB_CACHE=/tmp/clcache .venv/bin/python benchmarks/scale.py [--n 64 --shard-size 8 --steps 5
     --pings 200]

Baseline (named "local"): the same EAP-IG scoring in this process with 2 torch threads (`edge_scores` over the
whole task). Measured, on the same machine, in the same process:
- "ray": 2 Ray workers x 1 thread scoring the task in shards of --shard-size prompts (`Executor.partials`,
  the path `--backend ray` takes), split into start-up (measured apart on fresh actors: created, model
  loaded in each worker) and scoring (the rest, which includes each worker's first-call costs, while the
  baseline is timed after a 1-prompt warm-up); printed as ratios to the baseline (overhead ratio: > 1 =
  sharding costs time on this machine);
- the per-shard scheduling overhead: round trips of an empty call to the workers (`ShardWorker.ping`);
- the largest difference between the merged and the one-process scores (must be <= 1e-5).
Then a PROJECTION (not a measurement) for N machines of 2 cores each: start-up once (in parallel) + the
measured scoring time / N + the measured per-shard overhead x shards, assuming shards spread evenly.
"""

from __future__ import annotations

import argparse
import time

import torch

from circuitlab import load_model
from circuitlab.discovery import edge_scores
from circuitlab.runner.executor import Executor, ShardWorker
from circuitlab.runner.registry import get_analysis
from circuitlab.runner.shards import ShardStore, split_task
from circuitlab.tasks.source import TaskSource

SPEC = "smollm2-135m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="IOI prompts")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation points")
    parser.add_argument("--pings", type=int, default=200, help="empty calls timed for the per-shard overhead")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(2)
    model = load_model(SPEC)
    task = TaskSource(name="ioi", n=args.n, seed=0).build(model)
    print(f"{SPEC}: EAP-IG (steps {args.steps}) over {len(task)} IOI prompts, shards of {args.shard_size}")

    start = time.perf_counter()
    edge_scores(model, task.subset(1), method="eap-ig", steps=args.steps)  # one-time costs (graph, self-check)
    print(f"local warm-up (1 prompt, first call): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    local = edge_scores(model, task, method="eap-ig", steps=args.steps)
    local_s = time.perf_counter() - start
    print(f"local (1 process x 2 threads, the baseline): {local_s:.2f} s")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        entry = get_analysis("discover/eap-ig")
        params = entry.make_params({"steps": args.steps, "top_n": 10, "curve": False})
        executor = Executor(backend="ray", workers=2, threads_per_worker=1, shard_size=args.shard_size)
        shards = split_task(task, args.shard_size)

        actor_class = ray.remote(num_cpus=1)(ShardWorker)
        start = time.perf_counter()
        actors = [actor_class.remote(SPEC, 1) for _ in range(2)]
        ray.get([a.ping.remote() for a in actors])
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        ray.get([actors[i % 2].ping.remote() for i in range(args.pings)])
        per_shard_s = (time.perf_counter() - start) / args.pings
        for actor in actors:
            ray.kill(actor)

        start = time.perf_counter()
        partials = executor.partials(entry, SPEC, None, shards, params, ShardStore(None))
        ray_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    merged = sum(p.scores for p in partials) / sum(p.n for p in partials)
    diff = float((merged - local.scores).abs().max())
    scoring_s = max(ray_s - startup_s, 1e-9)
    print(f"ray (2 workers x 1 thread): {ray_s:.2f} s in all = start-up {startup_s:.2f} s (actors + model load) "
          f"+ scoring {scoring_s:.2f} s")
    print(f"overhead ratio vs local: {ray_s / local_s:.2f}x in all, {scoring_s / local_s:.2f}x scoring only")
    print(f"per-shard scheduling overhead (empty call round trip): {per_shard_s * 1e3:.2f} ms; "
          f"{len(shards)} shards -> {len(shards) * per_shard_s:.3f} s")
    print(f"max |merged - local| edge score: {diff:.2e} (must be <= 1e-5)")
    print("PROJECTION (not measured): N machines x 2 cores, shards spread evenly:")
    for machines in (1, 2, 4, 8, 16):
        projected = startup_s + scoring_s / machines + len(shards) * per_shard_s
        print(f"  N={machines:>2}: {projected:7.2f} s ({local_s / projected:.2f}x the one-process run)")


if __name__ == "__main__":
    main()
