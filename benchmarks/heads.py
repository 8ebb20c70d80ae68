"""Composition scores on SmolLM2-135M: circuitlab's factored computation vs TransformerLens' reference.

For the first --layers layers (every head pair in different layers, Q, K and V), times
`circuitlab.heads.composition.weight_scores` (d_head-sized factors, one writer layer against all later
readers per batched product) against TransformerLens' `utilities.composition_scores` on the bridge's
`FactoredMatrix` OV / QK circuits (what `TransformerBridge.all_composition_scores` runs, restricted to
the same layers), and prints the speed-up and the largest score difference. All 30 layers with
TransformerLens take many minutes; the ratio is the number to read.

Run: .venv/bin/python benchmarks/heads.py [--layers 6] [--threads N]
The machine may be shared: timings wobble.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformer_lens.FactoredMatrix import FactoredMatrix
    from transformer_lens.utilities import composition_scores as tl_scores

    from circuitlab import load_model
    from circuitlab.heads.composition import MODES, HeadWeights, head_weights, weight_scores

    model = load_model("smollm2-135m")
    full = head_weights(model)
    w = HeadWeights(*(getattr(full, name)[:args.layers] for name in ("W_Q", "W_K", "W_V", "W_O")))

    start = time.perf_counter()
    ours = weight_scores(w)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        left = FactoredMatrix(w.W_V, w.W_O)
        qk = FactoredMatrix(w.W_Q, w.W_K.transpose(-2, -1))
        theirs = {mode: tl_scores(left, right, broadcast_dims=True)
                  for mode, right in (("q", qk), ("k", qk.T), ("v", left))}
    tl_s = time.perf_counter() - start

    defined = ~ours["k"].isnan()
    diff = max(float((ours[m][defined] - theirs[m][defined]).abs().max()) for m in MODES)
    n_pairs = int(defined.sum())
    print(f"SmolLM2-135M, first {args.layers} layers: {n_pairs} head pairs x 3 modes")
    print(f"circuitlab (factored)       {ours_s:8.2f} s")
    print(f"TransformerLens (reference) {tl_s:8.2f} s   (scores all {w.W_Q.shape[0] * w.W_Q.shape[1]}^2 pairs)")
    print(f"speed-up {tl_s / ours_s:.1f}x; largest |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
