"""ACDC: batched (restarted runs + speculative batches) vs sequential (one full masked run per edge).

Part 1 (same graph, same tau): the trained ground-truth induction model (attention only, 2 layers) on
repeated random tokens; runs `acdc` and `acdc_sequential`, asserts they keep the same
circuit edge for edge, and prints wall times, forwards and the ratio (goal >= 10x).
Part 2 (SmolLM2-135M, IOI, one template): `acdc` on the first `--receivers` receivers in ACDC's order,
timed per receiver, and a PROJECTION of the full run: each receiver's time is modelled as proportional
to (its incoming edges) x (blocks its runs replay: n_layers - layer, and 0.3 for the logits' final norm
and unembedding), fitted on the measured receivers. The projection assumes the measured receivers'
speculation hit rate holds everywhere; read it as an order of magnitude. `--full` runs the whole graph.

Run: .venv/bin/python benchmarks/acdc.py [--n 8] [--tau 0.01] [--ablation corrupt]
         [--smollm-n 4] [--receivers 3] [--full] [--skip-smollm] [--threads N]
The machine may be shared: timings wobble, the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import time

import torch


def part_same_graph(args: argparse.Namespace) -> None:
    from circuitlab.discovery.acdc import acdc, acdc_sequential
    from circuitlab.discovery.ground_truth import TRAINED, load_ground_truth

    model, task, _ = load_ground_truth(TRAINED, n=args.n)
    prepared = task.prepare(model)
    acdc(model, prepared, tau=args.tau, ablation=args.ablation, receivers=1)  # warm-up (self-check)
    start = time.perf_counter()
    fast = acdc(model, prepared, tau=args.tau, ablation=args.ablation)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    plain = acdc_sequential(model, prepared, tau=args.tau, ablation=args.ablation)
    t_plain = time.perf_counter() - start
    same = torch.equal(fast.in_graph, plain.in_graph)
    print(f"[same graph] {model.spec}: {fast.graph.n_edges} edges, {prepared.n_prompts} prompts, tau {args.tau}, "
          f"ablation {args.ablation}, metric {fast.metric}")
    print(f"  sequential (baseline): {t_plain:8.2f} s  {plain.n_forwards:6d} forwards  {plain.n_circuits:6d} circuits")
    print(f"  batched              : {t_fast:8.2f} s  {fast.n_forwards:6d} forwards  {fast.n_circuits:6d} circuits")
    print(f"  ratio sequential / batched: {t_plain / t_fast:.1f}x   circuit: {fast.n_edges} edges, "
          f"same edge for edge: {same}")
    assert same, "batched and sequential ACDC kept different circuits"


def part_smollm(args: argparse.Namespace) -> None:
    from circuitlab import load_model
    from circuitlab.discovery.acdc import acdc, incoming_edges, receiver_order
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    prepared = make_task("ioi", model, n=args.smollm_n, templates=[0]).prepare(model)
    acdc(model, prepared, tau=args.tau, ablation=args.ablation, receivers=1)  # warm-up
    limit = None if args.full else args.receivers
    start = time.perf_counter()
    found = acdc(model, prepared, tau=args.tau, ablation=args.ablation, receivers=limit)
    wall = time.perf_counter() - start
    graph = found.graph
    n_layers = graph.shape.n_layers
    print(f"[SmolLM2 IOI] {graph.n_edges} edges, {prepared.n_prompts} prompts, tau {args.tau}: {len(found.steps)} "
          f"receivers in {wall:.1f} s, {found.n_forwards} forwards, {found.n_circuits} circuits")
    for step in found.steps:
        print(f"  {step.receiver:>10}: {step.edges:4d} edges, {step.removed:4d} removed, {step.forwards:4d} forwards, "
              f"{step.seconds:7.2f} s{'  (skipped)' if step.skipped else ''}")
    if args.full:
        return
    incoming = incoming_edges(graph)

    def cost(r: int) -> float:
        layer = graph.node_layer(graph.receivers[r].split("<")[0])
        return len(incoming[r]) * (0.3 if layer == n_layers else n_layers - layer)

    measured = [s for s in found.steps if not s.skipped]
    rate = sum(s.seconds for s in measured) / max(sum(cost(graph.receiver_index[s.receiver]) for s in measured), 1e-9)
    total = sum(cost(r) for r in receiver_order(graph)) * rate
    print(f"  PROJECTION (not measured) of the full graph: {total / 3600:.1f} h (every receiver visited; skipped "
          "receivers would make it shorter)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--ablation", default="corrupt")
    parser.add_argument("--smollm-n", type=int, default=4)
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--skip-smollm", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    part_same_graph(args)
    if not args.skip_smollm:
        part_smollm(args)


if __name__ == "__main__":
    main()
