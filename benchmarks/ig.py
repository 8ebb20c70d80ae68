"""circuitlab's integrated gradients vs Captum's LayerIntegratedGradients on SmolLM2-135M, IOI, one process.

Same prompts, baseline (the corrupt prompts, BOS kept), rule and steps; both on the same bridge, Captum
hooking `bridge.embed`. circuitlab's time includes its completeness check (f(x), f(x')); Captum runs without
`return_convergence_delta`. Runs alternate (ours, captum, ours, captum, ...) and the best of each is kept.
Prints the times, the ratio (captum / circuitlab: > 1 means circuitlab is faster), the max relative
difference of the attributions and circuitlab's completeness gap.

Run: .venv/bin/python benchmarks/ig.py [--n 2] [--steps 32] [--rule gausslegendre] [--repeats 2] [--threads N]
The machine may be shared: timings wobble, the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rule", default="gausslegendre")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from captum.attr import LayerIntegratedGradients

    from circuitlab import load_model
    from circuitlab.attribution import layer_integrated_gradients
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    prepared = make_task("ioi", model, n=args.n, templates=[0]).prepare(model)
    batch = prepared.single_batch()

    def ours():
        return layer_integrated_gradients(model, batch, prepared.metric, baseline="corrupt", steps=args.steps, rule=args.rule)

    def forward(tokens):
        repeated = batch.select(list(range(batch.size)) * (tokens.shape[0] // batch.size))
        return prepared.metric(model.bridge(tokens), repeated)

    baseline_tokens = batch.corrupt.clone()
    baseline_tokens[:, 0] = batch.clean[:, 0]

    def captum():
        lig = LayerIntegratedGradients(forward, model.bridge.embed)
        return lig.attribute(batch.clean, baselines=baseline_tokens, n_steps=args.steps, method=args.rule).sum(-1)

    times: dict[str, list[float]] = {"circuitlab": [], "captum": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("circuitlab", ours), ("captum", captum)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    mine, theirs = outputs["circuitlab"], outputs["captum"]
    rel = float((mine.attributions - theirs).abs().max() / theirs.abs().max())
    print(f"SmolLM2-135M IOI: {batch.size} prompts x {batch.n_pos} tokens, {args.steps} steps, {args.rule}, "
          f"corrupt baseline, torch threads {torch.get_num_threads()}")
    print(f"circuitlab {best['circuitlab']:.2f} s   captum {best['captum']:.2f} s   "
          f"ratio captum/circuitlab {best['captum'] / best['circuitlab']:.2f}   (all runs: {times})")
    print(f"max relative difference of attributions: {rel:.2e}")
    print(f"circuitlab completeness gap (relative, max over prompts): {float(mine.relative_gap.max()):.2e}")


if __name__ == "__main__":
    main()
