"""Cost of circuit discovery on SmolLM2-135M IOI vs one forward+backward of the same batch.

Run: CIRCUITLAB_CACHE=/tmp/clcache .venv/bin/python benchmarks/discovery.py [--n 8 --steps 5 --repeats 3
     --exact-edges 64 --exact-full-edges 32]

Baseline: one forward of the clean batch plus the backward of the logit difference to the input embeddings
(activation gradients, what EAP needs; no weight gradients). Printed, each as a median of paired ratios
(baseline and method alternate, so both see the same load on a shared machine):
- EAP over all 123,211 edges (target: at most 3x; the floor is about 2 forwards + 1 backward);
- EAP-IG with m = --steps points (target: at most 3(m+1)/2 x the baseline, 9x for m = 5);
- with --act, EAP-IG-activations (m x (2L + 1) points: expect about 2L + 1 times EAP-IG; no target);
- exact effects: edges per second (one masked run per edge, many per forward, each restarted at its
  receiver's layer from one recorded clean run) on --exact-edges random edges into each of five receiver
  layers (0, L/3, 2L/3, L-1, logits), the all-edges time estimated from them (seconds per edge
  interpolated over layers, weighted by each layer's edge count), against the same rows as full masked
  forwards (no restart, the old method) on --exact-full-edges edges;
- the process's peak resident memory after each step (the score tensor is [n_edges] per batch; the
  masked run holds the senders' output differences, [n_senders, batch * pos * d_model] floats).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from paired import paired_ratio  # benchmarks/paired.py (scripts run from this folder)

from circuitlab import load_model
from circuitlab.discovery import edge_scores
from circuitlab.discovery.metrics import discovery_metric
from circuitlab.discovery.scores import BatchInputs, exact_sums
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.hooks import hook_name
from circuitlab.tasks.source import TaskSource


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (the largest equal-length group is used)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exact-edges", type=int, default=64, help="edges per sampled receiver layer")
    parser.add_argument("--exact-full-edges", type=int, default=32, help="edges for the no-restart baseline")
    parser.add_argument("--act", action="store_true", help="also time EAP-IG-activations (slow: 61x EAP-IG points)")
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

    base_s, eap_s, ratio = paired_ratio(forward_backward, lambda: edge_scores(model, prepared, method="eap", graph=graph),
                                  args.repeats)
    print(f"EAP: forward+backward {base_s:.3f} s, EAP {eap_s:.3f} s; median paired ratio {ratio:.2f}x "
          f"(target <= 3x); peak RSS {peak_mib():.0f} MiB")
    _, ig_s, ig_ratio = paired_ratio(forward_backward, lambda: edge_scores(model, prepared, method="eap-ig",
                                                                     steps=args.steps, graph=graph), args.repeats)
    target = 3 * (args.steps + 1) / 2
    print(f"EAP-IG m={args.steps}: {ig_s:.3f} s; median paired ratio {ig_ratio:.2f}x (target <= {target:.1f}x), "
          f"{ig_s / eap_s:.2f}x EAP; peak RSS {peak_mib():.0f} MiB")

    if args.act:
        _, act_s, act_ratio = paired_ratio(forward_backward, lambda: edge_scores(
            model, prepared, method="eap-ig-act", steps=args.steps, graph=graph), 1)
        print(f"EAP-IG-activations m={args.steps}: {act_s:.3f} s; ratio {act_ratio:.2f}x, {act_s / ig_s:.1f}x EAP-IG; "
              f"peak RSS {peak_mib():.0f} MiB")

    scorer = discovery_metric(prepared)
    inputs = BatchInputs.build(engine, batch, "corrupt", scorer)
    gen = torch.Generator().manual_seed(0)
    n_layers = graph.shape.n_layers
    seconds_per_edge: dict[int, float] = {}
    picked = []
    sums = torch.full((graph.n_edges,), float("nan"))
    exact_sums(engine, inputs, scorer, edges=torch.arange(2))  # warm-up (first restarted runs, allocations)
    for layer in sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1, n_layers}):
        into = torch.nonzero(engine.edge_layer == layer).flatten()
        edges = into[torch.randperm(len(into), generator=gen)[:args.exact_edges]]
        picked.append(edges)
        start = time.perf_counter()
        part, _ = exact_sums(engine, inputs, scorer, edges=edges)
        seconds_per_edge[layer] = (time.perf_counter() - start) / len(edges)
        print(f"exact effects into layer {layer} ({'logits' if layer == n_layers else 'heads and MLP'}): "
              f"{1 / seconds_per_edge[layer]:.1f} edges/s")
        sums[edges] = part[edges]
    known = sorted(seconds_per_edge)
    counts = torch.bincount(engine.edge_layer, minlength=n_layers + 1).tolist()
    ys = [seconds_per_edge[k] for k in known]
    estimate = sum(count * _interpolate(known, ys, layer) for layer, count in enumerate(counts))
    rate = graph.n_edges / estimate
    print(f"exact effects, all {graph.n_edges} edges (estimated): {estimate / 3600:.2f} h = {rate:.1f} edges/s; "
          f"peak RSS {peak_mib():.0f} MiB")
    # Baseline: the same single-edge rows as full masked forwards (no recorded clean run), same chunking.
    edges = torch.cat(picked)
    few = edges[torch.randperm(len(edges), generator=gen)[:args.exact_full_edges]]
    per_forward = max(1, int(2**28 // (batch.clean.numel() * model.d_vocab * 4)))
    start = time.perf_counter()
    with torch.no_grad():
        full_values = scorer(engine.run(batch.clean, torch.ones(graph.n_edges), inputs.ablated), batch)
        worst = 0.0
        for first in range(0, len(few), per_forward):
            ids = few[first:first + per_forward]
            rows = torch.ones(len(ids), graph.n_edges)
            rows[torch.arange(len(ids)), ids] = 0.0
            logits = engine.run(batch.clean, rows, inputs.ablated)
            repeated, _ = inputs.repeated(len(ids))
            values = scorer(logits.reshape(-1, *logits.shape[2:]), repeated).view(len(ids), -1).sum(1)
            worst = max(worst, float((values - full_values.sum() - sums[ids]).abs().max()))
    base_elapsed = time.perf_counter() - start
    base_rate = len(few) / base_elapsed
    print(f"exact effects as full masked runs: {len(few)} edges in {base_elapsed:.2f} s = {base_rate:.2f} edges/s; "
          f"restart speed-up {rate / base_rate:.1f}x; max |difference| of the summed effects {worst:.2g}")


def _interpolate(xs: list[int], ys: list[float], x: int) -> float:
    """Piecewise-linear y(x) through the points (xs increasing)."""
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


if __name__ == "__main__":
    main()
