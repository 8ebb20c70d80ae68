"""Cost of a masked-edge run vs a plain forward on SmolLM2-135M (target: at most 2x).

Run: CIRCUITLAB_CACHE=/tmp/clcache .venv/bin/python benchmarks/masked_run.py [--batch 2 --pos 10 --repeats 5]
Prints seconds per forward and the ratio for three coefficient sets: dense random in [0,1] (the worst
case: every edge mixes), a binary circuit (top 5% of random scores), and a path-patching mask (one
sender's direct edges into one layer's queries).

Then restarted runs (issue 11): coefficient sets that change only edges into late receivers, run from
the recorded clean run (`engine.record`, recorded once, outside the timing) against the same set as a
full masked run: the median paired ratio full / restarted (higher = the restart saves more), and the
restarted run against a plain forward. The max |difference| of the logits is printed as a check.
"""

from __future__ import annotations

import argparse

import torch
from paired import paired_ratio  # benchmarks/paired.py (scripts run from this folder)

from circuitlab import load_model
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import path_coefficients, resolve_receivers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    engine = MaskedEdgeEngine(model)
    graph = engine.graph
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(100, 40000, (args.batch, args.pos), generator=gen)
    corrupt = torch.randint(100, 40000, (args.batch, args.pos), generator=gen)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    coefficient_sets = {
        "dense random": torch.rand(graph.n_edges, generator=gen),
        "circuit (top 5%)": (torch.rand(graph.n_edges, generator=gen) > 0.95).float(),
        "path patch a3.h0 -> a9.h*<q>": path_coefficients(graph, ["a3.h0"], resolve_receivers(graph, "a9.h*<q>")),
    }
    print(f"SmolLM2-135M, {graph.n_edges} edges, batch {args.batch} x {args.pos} tokens, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        for name, coeff in coefficient_sets.items():
            plain_s, masked_s, ratio = paired_ratio(lambda: model.bridge(clean, return_type="logits"),
                                                    lambda c=coeff: engine.run(clean, c, ablated), args.repeats)
            print(f"{name}: plain {plain_s:.3f} s, masked {masked_s:.3f} s (min of {args.repeats}); "
                  f"median paired ratio {ratio:.2f}x")

    record = engine.record(clean)
    late = {}
    for start in (15, 24, 29):
        row = torch.rand(graph.n_edges, generator=gen)
        row[engine.edge_layer < start] = 1.0
        late[f"random on edges into layers >= {start}"] = row
    late["one edge a20.h3 -> a25.h1<q> ablated"] = torch.ones(graph.n_edges)
    late["one edge a20.h3 -> a25.h1<q> ablated"][graph.edge_id("a20.h3->a25.h1<q>")] = 0.0
    late["edges into the logits only (random)"] = torch.where(engine.edge_layer == graph.shape.n_layers,
                                                             torch.rand(graph.n_edges, generator=gen), 1.0)
    print(f"restarted runs (from engine.record; restart_error: {engine.restart_error})")
    with torch.no_grad():
        for name, coeff in late.items():
            full_s, restart_s, ratio = paired_ratio(lambda c=coeff: engine.run(clean, c, ablated),
                                                    lambda c=coeff: engine.run(clean, c, ablated, record=record),
                                                    args.repeats)
            _, _, vs_plain = paired_ratio(lambda: model.bridge(clean, return_type="logits"),
                                          lambda c=coeff: engine.run(clean, c, ablated, record=record), args.repeats)
            diff = float((engine.run(clean, coeff, ablated) - engine.run(clean, coeff, ablated, record=record)).abs().max())
            print(f"{name} (restart at {engine.restart_layer(coeff)}): full {full_s:.3f} s, restarted "
                  f"{restart_s:.3f} s; median paired ratio full/restarted {1 / ratio:.2f}x, restarted/plain "
                  f"{vs_plain:.2f}x; max |diff| {diff:.2g}")


if __name__ == "__main__":
    main()
