"""Attribution patching vs real activation patching on SmolLM2-135M, IOI (8 prompts, one template).

For resid_pre, attn_out, mlp_out (by layer and position) and head z (by layer and head, all positions),
prints, for each direction (denoise: gradient at the corrupt run; noise: gradient at the clean run), the
Pearson correlation between attribution patching's normalised effects and real activation patching's in
the same direction, and the speed-up: one AtP call (one donor forward, one receiving forward + backward,
all four sites at once) against the four real sweeps. The real reference is circuitlab.patching's
ActivationPatcher by default (`--reference tl` uses transformer_lens.patching, much slower).

Run: .venv/bin/python benchmarks/atp.py [--n 8] [--reference circuitlab|tl] [--threads N]
         [--directions denoise,noise]
The machine may be shared: timings wobble, the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--reference", choices=("circuitlab", "tl"), default="circuitlab")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--directions", default="denoise,noise")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from circuitlab import load_model
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    prepared = make_task("ioi", model, n=args.n, templates=[0]).prepare(model)
    batch = prepared.single_batch()

    for direction in args.directions.split(","):
        _compare(model, prepared, batch, direction, args.reference)


def _compare(model, prepared, batch, direction: str, reference: str) -> None:
    from circuitlab.attribution import attribution_patching

    atp_runs = []
    for _ in range(2):  # best of two: the first call also pays one-off warm-up costs
        start = time.perf_counter()
        atp = attribution_patching(model, batch, prepared.metric, sites=("resid_pre", "attn_out", "mlp_out", "z"),
                                   direction=direction)
        atp_runs.append(time.perf_counter() - start)
    atp_s = min(atp_runs)
    estimates = {site: atp.effects[site] for site in ("resid_pre", "attn_out", "mlp_out")}
    estimates["z"] = atp.head_all_positions()

    real, real_s = (_real_circuitlab if reference == "circuitlab" else _real_tl)(model, prepared, batch, direction)
    print(f"SmolLM2-135M IOI, direction {direction}: {batch.size} prompts x {batch.n_pos} tokens, reference "
          f"{reference}, torch threads {torch.get_num_threads()}; clean {atp.clean_metric:.3f}, "
          f"corrupt {atp.corrupt_metric:.3f}")
    for site in ("resid_pre", "attn_out", "mlp_out", "z"):
        a, r = estimates[site].flatten().numpy(), np.asarray(real[site], dtype=float).flatten()
        corr = float(np.corrcoef(a, r)[0, 1])
        print(f"{site:9s} cells {a.size:4d}  corr {corr:6.3f}  max|real| {np.abs(r).max():.3f}  "
              f"max|atp| {np.abs(a).max():.3f}  real {real_s[site]:7.2f} s")
    total = sum(real_s.values())
    print(f"attribution patching {atp_s:.2f} s (all four sites)  real patching {total:.2f} s  "
          f"speed-up {total / atp_s:.1f}x")


def _real_circuitlab(model, prepared, batch, direction):
    from circuitlab.patching import ActivationPatcher

    patcher = ActivationPatcher(model, prepared, progress=False)
    real, seconds = {}, {}
    for site, by, cols in (("resid_pre", "layer,pos", "pos"), ("attn_out", "layer,pos", "pos"),
                           ("mlp_out", "layer,pos", "pos"), ("z", "layer,head", "head")):
        start = time.perf_counter()
        result = patcher.sweep(site, by, direction)
        seconds[site] = time.perf_counter() - start
        real[site] = result.grid("layer", cols)
    return real, seconds


def _real_tl(model, prepared, batch, direction):
    from transformer_lens import patching as tl_patching

    with torch.no_grad():
        clean_metric = float(prepared.metric(model.logits(batch.clean), batch).mean())
        corrupt_metric = float(prepared.metric(model.logits(batch.corrupt), batch).mean())

    def metric(logits):
        return (prepared.metric(logits, batch).mean() - corrupt_metric) / (clean_metric - corrupt_metric)

    functions = {"resid_pre": tl_patching.get_act_patch_resid_pre, "attn_out": tl_patching.get_act_patch_attn_out,
                 "mlp_out": tl_patching.get_act_patch_mlp_out, "z": tl_patching.get_act_patch_attn_head_out_all_pos}
    real, seconds = {}, {}
    receiving, donor = (batch.corrupt, batch.clean) if direction == "denoise" else (batch.clean, batch.corrupt)
    for site, fn in functions.items():
        start = time.perf_counter()
        with torch.no_grad():
            _, donor_cache = model.bridge.run_with_cache(donor)
            real[site] = fn(model.bridge, receiving, donor_cache, metric).numpy()
        seconds[site] = time.perf_counter() - start
    return real, seconds


if __name__ == "__main__":
    main()
