"""Path patching (Wang et al. 2022 app. B; Goldowsky-Dill et al. 2023): the effect of sender(s) -> receiver(s).

The sender's output taken from the corrupt run reaches the metric only through the chosen receivers'
chosen inputs (q, k, v, MLP input or logits); everything else stays at its clean value, and everything
downstream of the receivers is recomputed. Two implementations:

* `path_patch` (masked-edge engine): run the clean prompt with the corrupt prompt as ablation and every
  edge coefficient 1 except the direct edges sender -> receiver (0).
* `path_patch_classic` (the two-step algorithm): (1) cache the clean and corrupt runs; (2) run clean with
  every head output (hook_z) and MLP output frozen to its clean value except the senders' (corrupt), and
  record the receivers' inputs (hook_q/k/v of the head, the MLP's ln2 input, ln_final's input); (3) run
  clean with those recorded inputs patched in. It uses only bridge hooks, so it is an independent check.
  Under GQA a k/v input is shared by a kv group, so classic k/v receivers need n_kv_heads == n_heads.

The two agree when no receiver feeds another receiver (e.g. receivers in one layer, or logits): with
receivers in several layers, the masked version lets an earlier receiver's changed output reach a later
receiver, while the classic one overwrites the later receiver's whole input with its step-2 value.

Patterns: senders match node names (`a3.h*`, `m2`, `input`); receivers match receiver names when the
pattern has `<...>` (`a9.h*<q>`, `a9.h1<k>`), otherwise node names, a head meaning its q, k and v inputs
(`a9.h1`, `m5`, `logits`). Shell wildcards (`*`, `?`, `[..]`), comma-separated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.naming import match_names, parse_node, split_patterns, split_receiver

MetricFn = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, vocab] -> [batch]


def resolve_senders(graph: Graph, patterns: str | list[str]) -> list[str]:
    return match_names(patterns, graph.senders, "sender node")


def resolve_receivers(graph: Graph, patterns: str | list[str]) -> list[str]:
    """Receiver names matched by the patterns (see module docstring), in graph order."""
    chosen: set[str] = set()
    for pattern in split_patterns(patterns):
        if "<" in pattern:
            hits = [r for r in graph.receivers if fnmatchcase(r, pattern)]
        else:
            hits = [r for r in graph.receivers if fnmatchcase(r.split("<")[0], pattern)]
        if not hits:
            raise GraphError(
                f"receiver pattern {pattern!r} matches nothing in this graph ({graph.shape.describe()}); "
                "use e.g. 'a9.h*<q>', 'a9.h1', 'm5' or 'logits'"
            )
        chosen.update(hits)
    return [r for r in graph.receivers if r in chosen]


def path_coefficients(graph: Graph, senders: list[str], receivers: list[str]) -> torch.Tensor:
    """All ones except the direct edges sender -> receiver (0). GraphError if no such edge exists."""
    coeff = torch.ones(graph.n_edges)
    sender_set = torch.zeros(graph.n_senders, dtype=torch.bool)
    sender_set[[graph.sender_index[s] for s in senders]] = True
    receiver_set = torch.zeros(graph.n_receivers, dtype=torch.bool)
    receiver_set[[graph.receiver_index[r] for r in receivers]] = True
    direct = sender_set[graph.edge_src] & receiver_set[graph.edge_dst]
    if not bool(direct.any()):
        raise GraphError(f"no edge runs from {senders} to {receivers}: senders must lie in earlier layers than receivers")
    coeff[direct] = 0.0
    return coeff


@torch.no_grad()
def path_patch(engine: MaskedEdgeEngine, senders: str | list[str], receivers: str | list[str],
               clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Logits [batch, pos, vocab] of the clean run with senders -> receivers carrying the corrupt outputs."""
    graph = engine.graph
    coeff = path_coefficients(graph, resolve_senders(graph, senders), resolve_receivers(graph, receivers))
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    return engine.run(clean, coeff, ablated)


@torch.no_grad()
def path_patch_classic(model: Any, senders: str | list[str], receivers: str | list[str],
                       clean: torch.Tensor, corrupt: torch.Tensor, graph: Graph | None = None) -> torch.Tensor:
    """The two-step algorithm with bridge hooks only; logits [batch, pos, vocab]."""
    graph = graph or Graph.from_model(model)
    bridge = model.bridge
    sender_names = resolve_senders(graph, senders)
    receiver_names = resolve_receivers(graph, receivers)
    n_layers, attn_only = graph.shape.n_layers, graph.shape.attn_only
    grouped = (graph.shape.n_key_value_heads or graph.shape.n_heads) != graph.shape.n_heads
    if grouped and any(r.endswith(("<k>", "<v>")) for r in receiver_names):
        raise GraphError("classic path patching cannot ungroup GQA k/v inputs (one k/v per kv group); "
                         "use path_patch (masked-edge engine) or q / MLP / logits receivers")

    # Step 1: clean and corrupt head and MLP outputs.
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    names += [] if attn_only else [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    clean_acts = _record(bridge, clean, names)
    corrupt_acts = _record(bridge, corrupt, names)

    # Step 2: freeze every node to clean except the senders (corrupt); record the receivers' inputs.
    def frozen(name: str, patch_heads: list[int] | None, patch_all: bool):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            out = corrupt_acts[name].clone() if patch_all else clean_acts[name].clone()
            for h in patch_heads or []:
                out[:, :, h] = corrupt_acts[name][:, :, h]
            return out
        return hook

    parsed = [parse_node(s) for s in sender_names]
    step2 = []
    if any(p.kind == "input" for p in parsed):
        step2.append(("blocks.0.hook_resid_pre", frozen("blocks.0.hook_resid_pre", None, True)))
    for layer in range(n_layers):
        heads = [p.head for p in parsed if p.kind == "head" and p.layer == layer]
        name = f"blocks.{layer}.attn.hook_z"
        step2.append((name, frozen(name, heads, False)))  # type: ignore[arg-type]
        if not attn_only:
            name = f"blocks.{layer}.hook_mlp_out"
            step2.append((name, frozen(name, None, any(p.kind == "mlp" and p.layer == layer for p in parsed))))
    sites = {_receiver_site(r) for r in receiver_names}
    recorded: dict[str, torch.Tensor] = {}

    def record(site: str):
        def hook(x: torch.Tensor, hook: Any) -> None:
            recorded[site] = x.detach().clone()
        return hook

    bridge.run_with_hooks(clean, fwd_hooks=step2 + [(s, record(s)) for s in sorted(sites)], return_type=None)

    # Step 3: clean run with the receivers' inputs patched from step 2.
    def patch(site: str, head: int | None):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            x = x.clone()
            if head is None:
                return recorded[site]
            x[:, :, head] = recorded[site][:, :, head]
            return x
        return hook

    step3 = []
    for r in receiver_names:
        node, _ = split_receiver(r)
        head = parse_node(node).head
        step3.append((_receiver_site(r), patch(_receiver_site(r), head)))
    return bridge.run_with_hooks(clean, fwd_hooks=step3, return_type="logits")


def _receiver_site(receiver: str) -> str:
    node, qkv = split_receiver(receiver)
    parsed = parse_node(node)
    if parsed.kind == "head":
        return f"blocks.{parsed.layer}.attn.hook_{qkv}"
    if parsed.kind == "mlp":
        return f"blocks.{parsed.layer}.ln2.hook_in"
    return "ln_final.hook_in"


def _record(bridge: Any, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    store: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(x: torch.Tensor, hook: Any) -> None:
            store[name] = x.detach().clone()
        return hook

    bridge.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names], return_type=None)
    return store


@dataclass
class PathPatchSweep:
    """Per-sender-head effect into a receiver set. values: [n_layers, n_heads] mean metric after patching
    (NaN where the head has no edge into the receivers); clean / corrupt: mean metric of the plain runs."""

    receivers: list[str]
    values: torch.Tensor
    clean: float
    corrupt: float

    @property
    def delta(self) -> torch.Tensor:
        """values - clean (negative: the path carries behaviour that the corruption removes)."""
        return self.values - self.clean

    @property
    def normalised(self) -> torch.Tensor:
        """(values - clean) / (clean - corrupt): -1 = the path alone turns clean into corrupt behaviour."""
        denom = self.clean - self.corrupt
        return self.delta / denom if abs(denom) > 1e-9 else torch.full_like(self.values, float("nan"))

    def records(self) -> list[dict]:
        out = []
        for layer in range(self.values.shape[0]):
            for head in range(self.values.shape[1]):
                out.append({"sender": f"a{layer}.h{head}", "layer": layer, "head": head,
                            "metric": float(self.values[layer, head]), "delta": float(self.delta[layer, head]),
                            "normalised": float(self.normalised[layer, head])})
        return out


@torch.no_grad()
def path_patch_sweep(engine: MaskedEdgeEngine, receivers: str | list[str], clean: torch.Tensor, corrupt: torch.Tensor,
                     metric: MetricFn, *, chunk: int = 16) -> PathPatchSweep:
    """Every head as the sole sender into `receivers`, `chunk` senders per batched masked forward."""
    graph = engine.graph
    receiver_names = resolve_receivers(graph, receivers)
    L, H = graph.shape.n_layers, graph.shape.n_heads
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    clean_metric = float(metric(engine.model.bridge(clean, return_type="logits")).mean())
    corrupt_metric = float(metric(engine.model.bridge(corrupt, return_type="logits")).mean())
    values = torch.full((L, H), float("nan"))
    jobs: list[tuple[int, int, torch.Tensor]] = []
    for layer in range(L):
        for head in range(H):
            try:
                jobs.append((layer, head, path_coefficients(graph, [f"a{layer}.h{head}"], receiver_names)))
            except GraphError:
                continue  # no direct edge from this head into the receivers: NaN
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        logits = engine.run(clean, torch.stack([c for _, _, c in part]), ablated)  # [k, batch, pos, vocab]
        for (layer, head, _), lg in zip(part, logits, strict=True):
            values[layer, head] = float(metric(lg).mean())
    return PathPatchSweep(receiver_names, values, clean_metric, corrupt_metric)


def run_path_patching(model: Any, task: Any, receivers: str, out_dir: Any, *, seed: int = 0, chunk: int = 16) -> Any:
    """The `path-patch` command: sweep every head into `receivers` over a task (batches of equal token
    length, averaged weighted by size); writes a layer x head heatmap; returns the Result."""
    import time
    from pathlib import Path

    from circuitlab.graph.draw import plot_path_patching_sweep
    from circuitlab.results import Result

    start = time.perf_counter()
    prepared = task.prepare(model)
    engine = MaskedEdgeEngine(model)
    total, values, clean, corrupt = 0, None, 0.0, 0.0
    for batch in prepared:
        sweep = path_patch_sweep(engine, receivers, batch.clean, batch.corrupt,
                                 lambda logits, b=batch: prepared.metric(logits, b), chunk=chunk)
        weight = batch.size
        values = sweep.values * weight if values is None else values + sweep.values * weight
        clean += sweep.clean * weight
        corrupt += sweep.corrupt * weight
        total += weight
    assert values is not None
    combined = PathPatchSweep(sweep.receivers, values / total, clean / total, corrupt / total)
    elapsed = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heatmap = plot_path_patching_sweep(combined.normalised, out / "path_patching.png",
                                       title=f"path patching into {receivers}: (patched - clean) / (clean - corrupt)")
    finite = [r for r in combined.records() if r["normalised"] == r["normalised"]]
    strongest = min(finite, key=lambda r: r["normalised"]) if finite else {}
    summary = {"receivers": receivers, "n_receivers": len(combined.receivers), "clean_metric": combined.clean,
               "corrupt_metric": combined.corrupt, "strongest_sender": strongest.get("sender"),
               "strongest_normalised": strongest.get("normalised"), "n_edges_graph": engine.graph.n_edges}
    return Result("path-patch", model.info(), task.info(),
                  {"receivers": receivers, "resolved_receivers": combined.receivers, "ablation": "corrupt",
                   "method": "masked-edge (direct edges sender -> receivers)"},
                  combined.records(), seed=seed, timing_s=elapsed, load_s=getattr(model, "load_s", 0.0),
                  summary=summary, artifacts=[heatmap.name])
