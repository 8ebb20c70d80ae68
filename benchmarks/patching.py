"""circuitlab's ActivationPatcher vs transformer_lens.patching on SmolLM2-135M, IOI, one process.

Sweeps (each against its TransformerLens patching function, same bridge, same prompts, one IOI template so
positions align):
- by (layer, pos): resid_pre (get_act_patch_resid_pre), attn_out (get_act_patch_attn_out), mlp_out
  (get_act_patch_mlp_out), z with all heads at one position (generic_activation_patch with
  layer_pos_patch_setter on hook_z). circuitlab runs twice: "restart" restarts each patched run at its layer
  over all positions; "prefix" also reuses the unpatched positions before the patch (causal attention), so
  only positions >= p are recomputed from layer l on.
- by (layer, head): z over all positions (get_act_patch_attn_head_out_all_pos): every position is patched, so
  there is no prefix to reuse; the restart is the fast path.
The TransformerLens timing includes its clean run_with_cache, circuitlab's its clean + corrupt caching.
Reports time, speed-up against TransformerLens, max |diff| of the mean metric, and peak RSS growth (sampled).

Run: .venv/bin/python benchmarks/patching.py [--n 8] [--layers 0,10,20] [--max-batch 256] [--threads N]
     [--sweeps resid_pre,attn_out,mlp_out,z_pos,z_head]
The machine may be shared: timings wobble, the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch


class PeakRSS:
    """Peak resident memory growth (MiB) over a block, sampled every 5 ms from /proc/self/statm."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
    return out, elapsed, mem.growth_mib


SWEEPS = ("resid_pre", "attn_out", "mlp_out", "z_pos", "z_head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (one template)")
    parser.add_argument("--layers", default=None, help="comma-separated layer subset (default: all)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"which sweeps: {', '.join(SWEEPS)}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from functools import partial

    from transformer_lens import patching as tl_patching

    from circuitlab import load_model
    from circuitlab.patching import ActivationPatcher
    from circuitlab.patching.prefix import prefix_reuse
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    bridge = model.bridge
    prepared = make_task("ioi", model, n=args.n, templates=[0]).prepare(model)
    batch = prepared.single_batch()
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    support = prefix_reuse(model)  # the one-time causality check, cached per model: not part of any timing

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return prepared.metric(logits, batch).mean()

    z_by_pos = partial(tl_patching.generic_activation_patch, patch_setter=tl_patching.layer_pos_patch_setter,
                       activation_name="z", index_axis_names=("layer", "pos"))
    # name: (our site, granularity, TL function, TL axes, cells per layer, TL name)
    sweeps = {
        "resid_pre": ("resid_pre", "layer,pos", tl_patching.get_act_patch_resid_pre, ["layer", "pos"], batch.n_pos,
                      "get_act_patch_resid_pre"),
        "attn_out": ("attn_out", "layer,pos", tl_patching.get_act_patch_attn_out, ["layer", "pos"], batch.n_pos,
                     "get_act_patch_attn_out"),
        "mlp_out": ("mlp_out", "layer,pos", tl_patching.get_act_patch_mlp_out, ["layer", "pos"], batch.n_pos,
                    "get_act_patch_mlp_out"),
        "z_pos": ("z", "layer,pos", z_by_pos, ["layer", "pos"], batch.n_pos, "generic_activation_patch(z, layer,pos)"),
        "z_head": ("z", "layer,head", tl_patching.get_act_patch_attn_head_out_all_pos, ["layer", "head"],
                   model.n_heads, "get_act_patch_attn_head_out_all_pos"),
    }
    print(f"SmolLM2-135M, IOI n={args.n} ({batch.n_pos} tokens), torch threads={torch.get_num_threads()}, "
          f"max_batch={args.max_batch}, layers={'all' if layers is None else layers}, "
          f"prefix reuse {'available' if support.ok else 'unavailable: ' + support.reason}")
    for name in args.sweeps.split(","):
        site, by, tl_fn, axes, width, tl_name = sweeps[name]
        layer_list = layers or list(range(model.n_layers))

        def run_tl(tl_fn=tl_fn, axes=axes, width=width, layer_list=layer_list) -> torch.Tensor:
            with torch.no_grad():
                _, clean_cache = bridge.run_with_cache(batch.clean)
                index = pd.DataFrame([(lay, j) for lay in layer_list for j in range(width)], columns=axes)
                return tl_fn(bridge, batch.corrupt, clean_cache, metric, index_axis_names=None, index_df=index)

        def run_ours(site=site, by=by, prefix=True) -> Any:
            patcher = ActivationPatcher(model, prepared, max_batch=args.max_batch, prefix=prefix, progress=False)
            return patcher.sweep(site, by, layers=layers)

        theirs, tl_s, tl_mem = timed(run_tl)
        print(f"{site} by {by} ({name}): transformer_lens {tl_name} {tl_s:.2f} s (peak +{tl_mem:.0f} MiB)")
        # Without positions the default path is the restart (prefix reuse reports why it is off).
        variants = [("restart", False), ("prefix", True)] if "pos" in by else [("restart", True)]
        for label, prefix in variants:
            ours, ours_s, ours_mem = timed(partial(run_ours, prefix=prefix))
            diff = (ours.mean() - theirs.cpu()).abs().max().item()
            s = ours.stats
            print(f"  circuitlab {label:7s} {ours_s:7.2f} s (peak +{ours_mem:4.0f} MiB)  speed-up vs transformer_lens "
                  f"{tl_s / ours_s:5.2f}x  max|diff| {diff:.2e}  [cells {len(ours.cells)}, rows {s['rows']}, "
                  f"forwards {s['forwards']}, skipped {s['cells_skipped']}, prefix reuse {s['prefix_reuse']}]")
        if "pos" not in by:
            print("  (every position is patched: no prefix to reuse, so no prefix-reuse row)")


if __name__ == "__main__":
    main()
