"""circuitlab's ActivationPatcher vs transformer_lens.patching on SmolLM2-135M, IOI, one process.

Sweeps: resid_pre by (layer, pos) vs get_act_patch_resid_pre, and per-head z over all positions vs
get_act_patch_attn_head_out_all_pos. Both run on the same bridge and prompts (one IOI template so positions
align); the TransformerLens timing includes its clean run_with_cache, circuitlab's its clean + corrupt caching.
Reports time, speed-up, max |diff| of the mean metric, and peak RSS growth during each run (sampled).

Run: .venv/bin/python benchmarks/patching.py [--n 8] [--layers 0,10,20] [--max-batch 256] [--threads N]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts (one template)")
    parser.add_argument("--layers", default=None, help="comma-separated layer subset (default: all)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sweeps", default="resid_pre,z", help="which sweeps: resid_pre, z")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformer_lens import patching as tl_patching

    from circuitlab import load_model
    from circuitlab.patching import ActivationPatcher
    from circuitlab.tasks import make_task

    model = load_model("smollm2-135m")
    bridge = model.bridge
    prepared = make_task("ioi", model, n=args.n, templates=[0]).prepare(model)
    batch = prepared.single_batch()
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return prepared.metric(logits, batch).mean()

    sweeps = {
        "resid_pre": ("layer,pos", tl_patching.get_act_patch_resid_pre, ["layer", "pos"], batch.n_pos),
        "z": ("layer,head", tl_patching.get_act_patch_attn_head_out_all_pos, ["layer", "head"], model.n_heads),
    }
    print(f"SmolLM2-135M, IOI n={args.n} ({batch.n_pos} tokens), torch threads={torch.get_num_threads()}, "
          f"max_batch={args.max_batch}, layers={'all' if layers is None else layers}")
    for name in args.sweeps.split(","):
        by, tl_fn, axes, width = sweeps[name]
        layer_list = layers or list(range(model.n_layers))

        def run_tl(tl_fn=tl_fn, axes=axes, width=width, layer_list=layer_list) -> torch.Tensor:
            with torch.no_grad():
                _, clean_cache = bridge.run_with_cache(batch.clean)
                if layers is None:
                    return tl_fn(bridge, batch.corrupt, clean_cache, metric).flatten()
                index = pd.DataFrame([(lay, j) for lay in layer_list for j in range(width)], columns=axes)
                return tl_fn(bridge, batch.corrupt, clean_cache, metric, index_axis_names=None, index_df=index)

        def run_ours(name=name, by=by) -> Any:
            patcher = ActivationPatcher(model, prepared, max_batch=args.max_batch)
            return patcher.sweep(name, by, layers=layers)

        ours, ours_s, ours_mem = timed(run_ours)
        theirs, tl_s, tl_mem = timed(run_tl)
        diff = (ours.mean() - theirs.cpu()).abs().max().item()
        print(f"{name:9s} by {by:10s} cells={len(ours.cells):4d}  transformer_lens {tl_s:8.2f} s "
              f"(peak +{tl_mem:6.0f} MiB)  circuitlab {ours_s:7.2f} s (peak +{ours_mem:6.0f} MiB)  "
              f"speed-up {tl_s / ours_s:5.2f}x  max|diff| {diff:.2e}  "
              f"[rows {ours.stats['rows']}, forwards {ours.stats['forwards']}, skipped {ours.stats['cells_skipped']}]")


if __name__ == "__main__":
    main()
