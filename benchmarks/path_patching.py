"""Path-patching fast paths vs plain forwards and vs the classic two-step algorithm, on SmolLM2-135M.

Run: .venv/bin/python benchmarks/path_patching.py [--prompts 8 --classic-senders 12]

Two sweeps on an IOI batch (logit difference at the last position):
  logits      every sender (input, 270 heads, 30 MLPs) into the logits: `direct_logit_sweep`
  a20.h*<q>   every head before layer 20 into the queries of layer 20: `restart_sweep`
Each is timed against (a) one plain forward of the batch (cost reported in plain forwards; goal for
logits <= 5) and (b) the classic two-step algorithm (Wang et al. 2022), written here with plain
TransformerLens hooks: per sender, (1) a clean run with every head (hook_z) and MLP output frozen to
clean except the sender's (corrupt), recording the receivers' inputs, then (2) a clean run with those
inputs patched. The classic sweep is timed on `--classic-senders` senders and scaled to the whole
sweep (its cost per sender is constant); max |difference| of the normalised effects on those senders
is printed (goal <= 1e-4). Goal for a20.h*<q>: fast time <= 1/5 of the classic time.
"""

from __future__ import annotations

import argparse
import time

import torch

from circuitlab import load_model
from circuitlab.graph.direct_paths import direct_logit_sweep
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine, final_input_hook
from circuitlab.graph.naming import head_name, parse_node
from circuitlab.graph.path_patching import feeding_heads, resolve_receivers
from circuitlab.graph.restart import restart_sweep
from circuitlab.models.hooks import hook_name

NAMES = [("Mary", "John"), ("John", "Mary"), ("Tom", "Anna"), ("Anna", "Tom")]
PLACES = ["store", "park", "school", "beach"]


def ioi_batch(model, n: int):
    clean, corrupt, answers, wrong = [], [], [], []
    for i in range(n):
        a, b = NAMES[i % 4]
        place = PLACES[(i // 4) % 4]
        clean.append(f"When {a} and {b} went to the {place}, {b} gave a drink to")
        corrupt.append(f"When Paul and Kate went to the {place}, Lucy gave a drink to")
        answers.append(model.single_token_id(f" {a}"))
        wrong.append(model.single_token_id(f" {b}"))
    return model.to_tokens(clean), model.to_tokens(corrupt), torch.tensor(answers), torch.tensor(wrong)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def classic(model, sender: str, receivers: list[str], clean, corrupt, clean_acts, corrupt_acts):
    """The two-step algorithm with plain bridge hooks; returns the patched logits at the last position."""
    bridge, cfg = model.bridge, model.cfg
    parsed = parse_node(sender)
    freeze = []
    for layer in range(cfg.n_layers):
        name = hook_name("z", layer)
        heads = [parsed.head] if parsed.kind == "head" and parsed.layer == layer else []

        def z_hook(x, hook, name=name, heads=heads):
            out = clean_acts[name].clone()
            for h in heads:
                out[:, :, h] = corrupt_acts[name][:, :, h]
            return out
        freeze.append((name, z_hook))
        mlp = hook_name("mlp_out", layer)
        source = corrupt_acts if parsed.kind == "mlp" and parsed.layer == layer else clean_acts
        freeze.append((mlp, lambda x, hook, mlp=mlp, source=source: source[mlp]))
    if parsed.kind == "input":
        embed = hook_name("resid_pre", 0)
        freeze.insert(0, (embed, lambda x, hook: corrupt_acts[embed]))
    if receivers == ["logits"]:
        site, heads = final_input_hook(bridge), None
    else:
        layer = parse_node(receivers[0].split("<")[0]).layer
        site, heads = hook_name("q", layer), [parse_node(r.split("<")[0]).head for r in receivers]
    recorded = {}
    bridge.run_with_hooks(clean, fwd_hooks=[*freeze, (site, lambda x, hook: recorded.setdefault("x", x.clone()))],
                          return_type=None)

    def patch(x, hook):
        if heads is None:
            return recorded["x"]
        x = x.clone()
        x[:, :, heads] = recorded["x"][:, :, heads]
        return x
    return bridge.run_with_hooks(clean, fwd_hooks=[(site, patch)], return_type="logits")[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--classic-senders", type=int, default=12)
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m")
    clean, corrupt, answers, wrong = ioi_batch(model, args.prompts)
    rows = torch.arange(args.prompts)
    positions = torch.full((args.prompts, 1), clean.shape[1] - 1)
    columns, inverse = torch.unique(torch.cat([answers, wrong]), return_inverse=True)
    ia, iw = inverse[:args.prompts], inverse[args.prompts:]

    def readout(logits):  # [batch, 1, columns]
        return logits[rows, 0, ia] - logits[rows, 0, iw]

    def metric_last(last):  # [batch, vocab]
        return last[rows, answers] - last[rows, wrong]

    plain = best_of(lambda: model.bridge(clean, return_type="logits"))
    print(f"SmolLM2-135M, {args.prompts} prompts x {clean.shape[1]} tokens; one plain forward {plain:.3f} s")
    names = [hook_name("resid_pre", 0)] + [hook_name(s, layer) for layer in range(model.n_layers)
                                           for s in ("z", "mlp_out")]
    _, cache_c = model.bridge.run_with_cache(clean, names_filter=lambda n: n in names)
    _, cache_x = model.bridge.run_with_cache(corrupt, names_filter=lambda n: n in names)
    engine = MaskedEdgeEngine(model)
    graph: Graph = engine.graph

    for pattern in ("logits", "a20.h*<q>"):
        receivers = resolve_receivers(graph, pattern)
        senders = graph.senders if pattern == "logits" else [head_name(*lh) for lh in feeding_heads(graph, receivers)]
        result = {}

        def fast(pattern=pattern, receivers=receivers, senders=senders, result=result):
            if pattern == "logits":
                result["s"] = direct_logit_sweep(model, clean, corrupt, readout, positions, columns=columns,
                                                 senders=senders, max_batch=args.max_batch, graph=graph)
            else:
                result["s"] = restart_sweep(engine, receivers, clean, corrupt, readout, positions, senders,
                                            columns=columns, max_batch=args.max_batch)
        t_fast = best_of(fast, repeats=1 if pattern != "logits" else 3)
        sweep = result["s"]
        subset = senders[::max(1, len(senders) // args.classic_senders)][:args.classic_senders]
        start = time.perf_counter()
        got = {s: float(metric_last(classic(model, s, receivers, clean, corrupt, cache_c, cache_x)).mean()) for s in subset}
        t_classic = (time.perf_counter() - start) / len(subset) * len(senders)
        denom = sweep.clean - sweep.corrupt
        diff = 0.0
        for s in subset:
            p = parse_node(s)
            mine = sweep.values[p.layer, p.head] if p.kind == "head" else sweep.other[s]
            diff = max(diff, abs((float(mine) - got[s]) / denom))
        print(f"{pattern:>10}: {len(senders)} senders; fast {t_fast:.2f} s = {t_fast / plain:.1f} plain forwards; "
              f"classic ~{t_classic:.1f} s ({t_classic / t_fast:.1f}x slower, timed on {len(subset)} senders); "
              f"max |diff| normalised {diff:.2e}")


if __name__ == "__main__":
    main()
