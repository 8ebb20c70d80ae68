"""ACDC: batched (restarted runs + speculative batches) vs sequential (one full masked run per edge).

Part 1 (same graph, same tau; the baseline is `acdc_sequential`, run in the same process): `acdc` and
`acdc_sequential` on the same graph, prompts and tau; asserts they keep the same circuit edge for edge
(an edge whose damage lies within float32 rounding of tau may go either way: such edges are counted and
shown apart) and prints wall times, forwards, circuits evaluated and the ratio (goal >= 10x). Graphs:
- "trained": the trained ground-truth induction model (attention only, 2 layers, 81 edges), --n prompts;
- "wide": a seeded random native model, 8 layers x 8 heads, d_model 32, MLPs (6,637 edges), on repeated
  random tokens (4 per copy), at each of --wide-n prompt counts and tau --wide-tau.
Where the time goes: a masked forward costs a fixed per-forward part (the bridge's Python, hooks) plus a
part per row (circuits x prompts). Batching divides the first by the candidates per forward; restarts
save the blocks before the receiver's layer, which in the sequential run are plain (cheap) blocks. So the
ratio is largest when the fixed part dominates (many edges per receiver, few short prompts) and falls
toward ~2x as rows dominate (the speculative batches evaluate about twice the circuits, restarts save
about half the blocks).
Part 2 (SmolLM2-135M, IOI, one template), at each of --levels (edge: the full edge graph; head: a
head's q, k and v inputs as one receiver): `acdc` on the first `--receivers` receivers in ACDC's order,
timed per receiver, `acdc_sequential` on the same receivers at edge level (the measured ratio on the real
model; skip with --skip-smollm-sequential), and a PROJECTION of the full run: the seconds per circuit of a
batch restarted at each of --probe-layers (and the logits) are measured (--probe-circuits circuits each,
against a circuit with 90% of the later edges removed, as ACDC's state is by then)
and interpolated over layers; each receiver costs (its candidates) x (circuits per candidate, as measured
on the receivers run above) x (seconds per circuit at its layer). It assumes the measured receivers'
speculation hit rate holds everywhere and visits every receiver (skipped ones would make it shorter). The projection assumes the measured receivers'
speculation hit rate holds everywhere; read it as an order of magnitude. `--full` runs the whole graph.

Run: .venv/bin/python benchmarks/acdc.py [--n 8] [--tau 0.01] [--ablation corrupt] [--wide-n 1 4]
         [--wide-tau 1e-4] [--skip-wide] [--smollm-n 4] [--receivers 3] [--levels edge head] [--full]
         [--skip-smollm-sequential] [--skip-smollm] [--threads N]
The machine may be shared: timings wobble, the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import time

import torch


def compare(label: str, model, prepared, tau: float, ablation: str) -> None:  # noqa: ANN001 (Model, PreparedTask)
    """Batched vs sequential ACDC on one graph: times, forwards, circuits, ratio, same circuit."""
    from circuitlab.discovery.acdc import acdc, acdc_sequential

    acdc(model, prepared, tau=tau, ablation=ablation, receivers=1)  # warm-up (engine, self-check)
    start = time.perf_counter()
    fast = acdc(model, prepared, tau=tau, ablation=ablation)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    plain = acdc_sequential(model, prepared, tau=tau, ablation=ablation)
    t_plain = time.perf_counter() - start
    differ = (fast.in_graph != plain.in_graph).nonzero().flatten()
    # an edge tested at damage within float32 rounding of tau may be decided either way (acdc's docstring)
    scale = max(abs(plain.full_metric), abs(plain.final_metric), tau, 1e-12)
    margin = 64 * torch.finfo(torch.float32).eps * scale
    at_tau = [int(e) for e in differ if abs(abs(float(plain.scores[e])) - tau) <= margin]
    print(f"[{label}] {fast.graph.n_edges} edges, {prepared.n_prompts} prompts, tau {tau:g}, ablation {ablation}, "
          f"metric {fast.metric}")
    print(f"  sequential (baseline): {t_plain:8.2f} s  {plain.n_forwards:6d} forwards  {plain.n_circuits:6d} circuits")
    print(f"  batched              : {t_fast:8.2f} s  {fast.n_forwards:6d} forwards  {fast.n_circuits:6d} circuits")
    print(f"  ratio sequential / batched: {t_plain / t_fast:.1f}x   circuit: {fast.n_edges} edges; edges decided "
          f"differently: {len(differ)} ({len(at_tau)} of them at tau within rounding)")
    assert len(differ) == len(at_tau), "batched and sequential ACDC kept different circuits"


def part_same_graph(args: argparse.Namespace) -> None:
    from circuitlab.discovery.ground_truth import TRAINED, load_ground_truth, repeated_tokens_task
    from circuitlab.models.toy import toy_model

    model, task, _ = load_ground_truth(TRAINED, n=args.n)
    compare(f"trained {model.spec}", model, task.prepare(model), args.tau, args.ablation)
    if args.skip_wide:
        return
    wide = toy_model(n_layers=8, n_heads=8, d_model=32, d_head=4, d_mlp=128, d_vocab=64, n_ctx=32, seed=1)
    for n in args.wide_n:
        prepared = repeated_tokens_task(64, n=n, seq_len=4).prepare(wide)
        compare("wide 8 layers x 8 heads, d_model 32", wide, prepared, args.wide_tau, args.ablation)


def part_smollm(args: argparse.Namespace) -> None:
    from circuitlab import load_model
    from circuitlab.discovery.acdc import acdc, acdc_sequential, search_order
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    prepared = make_task("ioi", model, n=args.smollm_n, templates=[0]).prepare(model)
    acdc(model, prepared, tau=args.tau, ablation=args.ablation, receivers=1)  # warm-up
    limit = None if args.full else args.receivers
    for level in args.levels:
        start = time.perf_counter()
        found = acdc(model, prepared, tau=args.tau, ablation=args.ablation, receivers=limit, level=level)
        wall = time.perf_counter() - start
        graph, order = found.graph, search_order(found.graph, level)
        n_layers = graph.shape.n_layers
        print(f"[SmolLM2 IOI, {level} level] {graph.n_edges} edges in {sum(map(len, order.candidates))} candidates "
              f"at {len(order.names)} receivers, {prepared.n_prompts} prompts, tau {args.tau}: {len(found.steps)} "
              f"receivers in {wall:.1f} s, {found.n_forwards} forwards, {found.n_circuits} circuits")
        for step in found.steps:
            print(f"  {step.receiver:>10}: {step.edges:4d} edges, {step.removed:4d} removed, {step.forwards:4d} "
                  f"forwards, {step.seconds:7.2f} s{'  (skipped)' if step.skipped else ''}")
        if args.full:
            continue
        if level == "edge" and not args.skip_smollm_sequential:  # the reference on the same receivers
            start = time.perf_counter()
            plain = acdc_sequential(model, prepared, tau=args.tau, ablation=args.ablation, receivers=limit)
            seq_wall = time.perf_counter() - start
            same = bool(torch.equal(plain.in_graph, found.in_graph))
            print(f"  sequential (baseline) on the same {len(plain.steps)} receivers: {seq_wall:.1f} s, "
                  f"{plain.n_forwards} forwards; ratio {seq_wall / wall:.1f}x; same decisions: {same}")

        # Per layer, the measured seconds per circuit of a batch restarted there; circuits per candidate
        # from the receivers measured above (speculation re-evaluates some).
        measured = [i for i, step in enumerate(found.steps) if not step.skipped]
        tested = sum(len(order.candidates[i]) for i in measured)
        per_candidate = found.n_circuits / max(tested, 1)
        probes = {layer: seconds_per_circuit(model, prepared, found.graph, layer, args) for layer in args.probe_layers}
        probes[n_layers] = seconds_per_circuit(model, prepared, found.graph, n_layers, args)
        total = sum(len(order.candidates[i]) * per_candidate * interpolate(probes, order.layers[i])
                    for i in range(len(order.names)))
        print("  seconds per circuit restarted at layer: "
              + ", ".join(f"{layer}: {probes[layer]:.3f}" for layer in sorted(probes)))
        print(f"  PROJECTION (not measured) of the whole {level}-level graph: {total / 3600:.1f} h ({per_candidate:.2f} "
              "circuits per candidate as measured above, every receiver visited; skipped receivers would make it "
              "shorter)")


def seconds_per_circuit(model, prepared, graph, layer: int, args: argparse.Namespace) -> float:  # noqa: ANN001
    """Wall time per circuit of one batch of circuits restarted at `layer` (its first receiver's candidates,
    each alone; layer = n_layers: the logits), as ACDC's batches run them: against a circuit like the one
    ACDC holds when it gets there (edges into later layers mostly removed: 10% kept, seeded), so every later
    head recomputes its attention per head as in the real search; best of two."""
    from circuitlab.discovery.acdc import CircuitMetric
    from circuitlab.discovery.scores import scoring_setup

    prepared, engine, scorer = scoring_setup(model, prepared, ablation=args.ablation, metric="kl", positions="last",
                                             graph=graph)
    evaluate = CircuitMetric(engine, prepared, scorer, args.ablation)
    receiver = "logits" if layer == graph.shape.n_layers else f"a{layer}.h0<q>"
    ids = (graph.edge_dst == graph.receiver_index[receiver]).nonzero().flatten()[:args.probe_circuits]
    off = torch.eye(len(ids), dtype=torch.bool)
    base = torch.ones(graph.n_edges)
    later = engine.edge_layer > layer
    base[later & (torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(layer)) > 0.1)] = 0.0
    evaluate(base, ids, off[:2])  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        evaluate(base, ids, off)
        times.append((time.perf_counter() - start) / len(ids))
    return min(times)


def interpolate(points: dict[int, float], layer: int) -> float:
    """Linear interpolation of seconds per circuit between the probed layers (constant beyond them)."""
    xs = sorted(points)
    if layer <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:], strict=False):
        if layer <= hi:
            return points[lo] + (points[hi] - points[lo]) * (layer - lo) / (hi - lo)
    return points[xs[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--ablation", default="corrupt")
    parser.add_argument("--wide-n", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--wide-tau", type=float, default=1e-4)
    parser.add_argument("--skip-wide", action="store_true")
    parser.add_argument("--smollm-n", type=int, default=4)
    parser.add_argument("--receivers", type=int, default=3)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--probe-layers", type=int, nargs="+", default=[1, 8, 15, 22, 29])
    parser.add_argument("--probe-circuits", type=int, default=24)
    parser.add_argument("--levels", nargs="+", default=["edge", "head"], choices=["edge", "head"])
    parser.add_argument("--skip-smollm-sequential", action="store_true")
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
