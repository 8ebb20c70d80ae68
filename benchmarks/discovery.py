"""Cost of circuit discovery on SmolLM2-135M IOI vs one forward+backward of the same batch.

Run: CIRCUITLAB_CACHE=/tmp/clcache .venv/bin/python benchmarks/discovery.py [--n 8 --steps 5 --repeats 3
     --exact-edges 256]

Baseline: one forward of the clean batch plus the backward of the logit difference to the input embeddings
(activation gradients, what EAP needs; no weight gradients). Printed, each as a median of paired ratios
(baseline and method alternate, so both see the same load on a shared machine):
- EAP over all 123,211 edges (target: at most 3x; the floor is about 2 forwards + 1 backward);
- EAP-IG with m = --steps points (target: at most 3(m+1)/2 x the baseline, 9x for m = 5);
- exact effects: edges per second (one masked run per edge, many per forward) on --exact-edges edges;
- the process's peak resident memory after each step (the score tensor is [n_edges] per batch; the
  masked run holds the senders' output differences, [n_senders, batch * pos * d_model] floats).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch

from circuitlab import load_model
from circuitlab.discovery import edge_scores
from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import BatchInputs, exact_sums
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.hooks import hook_name
from circuitlab.tasks.source import TaskSource


def paired(baseline: Callable[[], object], method: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(min baseline s, min method s, median paired ratio), after one warm-up of each."""
    baseline()
    method()
    base, meth, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        method()
        end = time.perf_counter()
        base.append(middle - start)
        meth.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return min(base), min(meth), statistics.median(ratios)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (the largest equal-length group is used)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-edges", type=int, default=256)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    prepared = TaskSource(name="ioi", n=args.n, seed=0).build(model).prepare(model).largest_group()
    batch = prepared.batches[0]
    engine = MaskedEdgeEngine(model)
    graph = engine.graph
    print(f"SmolLM2-135M, {graph.n_edges} edges, IOI batch {batch.size} x {batch.n_pos} tokens, "
          f"{torch.get_num_threads()} threads; peak RSS after loading {peak_mib():.0f} MiB")

    def forward_backward() -> None:
        with torch.enable_grad():
            store: dict[str, torch.Tensor] = {}

            def leaf(x: torch.Tensor, hook: object) -> torch.Tensor:
                store["x"] = x.detach().requires_grad_(True)
                return store["x"]

            logits = model.bridge.run_with_hooks(batch.clean, fwd_hooks=[(hook_name("resid_pre", 0), leaf)])
            torch.autograd.grad(prepared.metric(logits, batch).sum(), store["x"])

    base_s, eap_s, ratio = paired(forward_backward, lambda: edge_scores(model, prepared, method="eap", graph=graph),
                                  args.repeats)
    print(f"EAP: forward+backward {base_s:.3f} s, EAP {eap_s:.3f} s; median paired ratio {ratio:.2f}x "
          f"(target <= 3x); peak RSS {peak_mib():.0f} MiB")
    _, ig_s, ig_ratio = paired(forward_backward, lambda: edge_scores(model, prepared, method="eap-ig",
                                                                     steps=args.steps, graph=graph), args.repeats)
    target = 3 * (args.steps + 1) / 2
    print(f"EAP-IG m={args.steps}: {ig_s:.3f} s; median paired ratio {ig_ratio:.2f}x (target <= {target:.1f}x), "
          f"{ig_s / eap_s:.2f}x EAP; peak RSS {peak_mib():.0f} MiB")

    scorer = discovery_metric(prepared)
    inputs = BatchInputs.build(engine, batch, "corrupt", scorer)
    edges = torch.randperm(graph.n_edges, generator=torch.Generator().manual_seed(0))[:args.exact_edges]
    start = time.perf_counter()
    exact_sums(engine, inputs, scorer, edges=edges)
    elapsed = time.perf_counter() - start
    rate = len(edges) / elapsed
    print(f"exact effects: {len(edges)} edges in {elapsed:.2f} s = {rate:.1f} edges/s "
          f"(all {graph.n_edges} edges: ~{graph.n_edges / rate / 3600:.1f} h); peak RSS {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
