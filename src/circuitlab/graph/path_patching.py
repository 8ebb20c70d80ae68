"""Path patching (Wang et al. 2022 app. B; Goldowsky-Dill et al. 2023): the effect of sender(s) -> receiver(s).

The sender's output taken from the corrupt run reaches the metric only through the chosen receivers'
chosen inputs (q, k, v, MLP input or logits); everything else stays at its clean value, and everything
downstream of the receivers is recomputed (docs/METHODS.md, "Path patching"). Two implementations:

* `path_patch` (masked-edge engine): run the clean prompt with the corrupt prompt as ablation and every
  edge coefficient 1 except the direct edges sender -> receiver (0).
* `path_patch_classic` (the two-step algorithm): (1) cache the clean and corrupt runs; (2) run clean with
  every head output (hook_z) and MLP output frozen to its clean value except the senders' (corrupt), and
  record the receivers' inputs (hook_q/k/v of the head, the MLP's input, the final norm's input); (3) run
  clean with those recorded inputs patched in. It uses only bridge hooks, so it is an independent check.
  Under GQA a k/v input is shared by a kv group, so classic k/v receivers need n_kv_heads == n_heads.

The two agree when no receiver feeds another receiver (e.g. receivers in one layer, or logits): with
receivers in several layers, the masked version lets an earlier receiver's changed output reach a later
receiver, while the classic one overwrites the later receiver's whole input with its step-2 value.
With a post-attention norm (Gemma-3) a head sender's output is its share of the normalised attention
output (graph/attention.py): the masked version swaps that share, the classic one patches z and lets the
norm rescale every head, so there they agree for input and MLP senders only.

Patterns: senders match node names (`a3.h*`, `m2`, `input`); receivers match receiver names when the
pattern has `<...>` (`a9.h*<q>`, `a9.h1<k>`), otherwise node names, a head meaning its q, k and v inputs
(`a9.h1`, `m5`, `logits`). Shell wildcards (`*`, `?`, `[..]`), comma-separated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import FwdHooks, HookFn, MaskedEdgeEngine, final_input_hook, mlp_input_hook
from circuitlab.graph.naming import (
    RECEIVER_FORMS,
    check_receiver_patterns,
    head_name,
    match_names,
    parse_node,
    split_patterns,
    split_receiver,
)
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

Tokens = Int[torch.Tensor, "batch pos"]
Logits = Float[torch.Tensor, "batch pos vocab"]
MetricFn = Callable[[Logits], Float[torch.Tensor, " batch"]]
Advance = Callable[[float], None]  # a progress bar's advance(n) (circuitlab.progress.progress_bar)


def resolve_senders(graph: Graph, patterns: str | list[str]) -> list[str]:
    return match_names(patterns, graph.senders, "sender node")


def valid_range(graph: Graph) -> str:
    """The names this graph has, for error messages: 'layers 0..29, heads 0..8, MLPs m0..m29, logits'."""
    last = graph.shape.n_layers - 1
    mlps = "" if graph.shape.attn_only else f", MLPs m0..m{last}"
    return f"layers 0..{last}, heads 0..{graph.shape.n_heads - 1}{mlps}, logits"


def resolve_receivers(graph: Graph, patterns: str | list[str]) -> list[str]:
    """Receiver names matched by the patterns (see module docstring), in graph order.

    Malformed patterns and patterns naming layers or heads this graph lacks are GraphErrors; the
    latter name the valid range."""
    chosen: set[str] = set()
    for pattern in check_receiver_patterns(patterns):
        if "<" in pattern:
            hits = [r for r in graph.receivers if fnmatchcase(r, pattern)]
        else:
            hits = [r for r in graph.receivers if fnmatchcase(r.split("<")[0], pattern)]
        if not hits:
            raise GraphError(
                f"receiver pattern {pattern!r} matches nothing in this graph ({graph.shape.describe()}): it has "
                f"{valid_range(graph)}; receivers are {RECEIVER_FORMS}"
            )
        chosen.update(hits)
    return [r for r in graph.receivers if r in chosen]


def path_coefficients(graph: Graph, senders: list[str], receivers: list[str]) -> Float[torch.Tensor, " edge"]:
    """All ones except the direct edges sender -> receiver (0). GraphError if no such edge exists."""
    coeff = torch.ones(graph.n_edges)
    sender_set = torch.zeros(graph.n_senders, dtype=torch.bool)
    sender_set[[graph.sender_index[s] for s in senders]] = True
    receiver_set = torch.zeros(graph.n_receivers, dtype=torch.bool)
    receiver_set[[graph.receiver_index[r] for r in receivers]] = True
    direct: Bool[torch.Tensor, " edge"] = sender_set[graph.edge_src] & receiver_set[graph.edge_dst]
    if not bool(direct.any()):
        raise GraphError(f"no edge runs from {senders} to {receivers}: senders must lie in earlier layers than receivers")
    coeff[direct] = 0.0
    return coeff


@torch.no_grad()
def path_patch(engine: MaskedEdgeEngine, senders: str | list[str], receivers: str | list[str],
               clean: Tokens, corrupt: Tokens) -> Logits:
    """Logits [batch, pos, vocab] of the clean run with senders -> receivers carrying the corrupt outputs."""
    graph = engine.graph
    coeff = path_coefficients(graph, resolve_senders(graph, senders), resolve_receivers(graph, receivers))
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    return engine.run(clean, coeff, ablated)


# --- the classic two-step algorithm ---------------------------------------------------------------------
@torch.no_grad()
def path_patch_classic(model: Model, senders: str | list[str], receivers: str | list[str],
                       clean: Tokens, corrupt: Tokens, graph: Graph | None = None) -> Logits:
    """The two-step algorithm with bridge hooks only; logits [batch, pos, vocab]."""
    graph = graph or Graph.from_model(model)
    bridge: TransformerBridge = model.bridge
    sender_names = resolve_senders(graph, senders)
    receiver_names = resolve_receivers(graph, receivers)
    n_layers, attn_only = graph.shape.n_layers, graph.shape.attn_only
    grouped = (graph.shape.n_key_value_heads or graph.shape.n_heads) != graph.shape.n_heads
    if grouped and any(r.endswith(("<k>", "<v>")) for r in receiver_names):
        raise GraphError("classic path patching cannot ungroup GQA k/v inputs (one k/v per kv group); "
                         "use path_patch (masked-edge engine) or q / MLP / logits receivers")

    # Step 1: clean and corrupt head and MLP outputs.
    embed = hook_name("resid_pre", 0)
    names = [embed] + [hook_name("z", layer) for layer in range(n_layers)]
    names += [] if attn_only else [hook_name("mlp_out", layer) for layer in range(n_layers)]
    clean_acts = _record(bridge, clean, names)
    corrupt_acts = _record(bridge, corrupt, names)

    # Step 2: freeze every node to clean except the senders (corrupt); record the receivers' inputs.
    def frozen(name: str, patch_heads: list[int], patch_all: bool) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            out = corrupt_acts[name].clone() if patch_all else clean_acts[name].clone()
            for h in patch_heads:
                out[:, :, h] = corrupt_acts[name][:, :, h]
            return out
        return hook

    parsed = [parse_node(s) for s in sender_names]
    step2: FwdHooks = []
    if any(p.kind == "input" for p in parsed):
        step2.append((embed, frozen(embed, [], True)))
    for layer in range(n_layers):
        heads = [p.head for p in parsed if p.kind == "head" and p.layer == layer and p.head is not None]
        step2.append((hook_name("z", layer), frozen(hook_name("z", layer), heads, False)))
        if not attn_only:
            mlp = any(p.kind == "mlp" and p.layer == layer for p in parsed)
            step2.append((hook_name("mlp_out", layer), frozen(hook_name("mlp_out", layer), [], mlp)))
    sites = {_receiver_hook(bridge, r) for r in receiver_names}
    recorded: dict[str, torch.Tensor] = {}

    def record(site: str) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            recorded[site] = x.detach().clone()
        return hook

    step2 += [(s, record(s)) for s in sorted(sites)]
    bridge.run_with_hooks(clean, fwd_hooks=step2, return_type=None)

    # Step 3: clean run with the receivers' inputs patched from step 2.
    def patch(site: str, head: int | None) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            if head is None:
                return recorded[site]
            x = x.clone()
            x[:, :, head] = recorded[site][:, :, head]
            return x
        return hook

    step3: FwdHooks = []
    for r in receiver_names:
        node, _ = split_receiver(r)
        step3.append((_receiver_hook(bridge, r), patch(_receiver_hook(bridge, r), parse_node(node).head)))
    logits: Logits = bridge.run_with_hooks(clean, fwd_hooks=step3, return_type="logits")
    return logits


def _receiver_hook(bridge: TransformerBridge, receiver: str) -> str:
    """The bridge hook holding a receiver's input: hook_q/k/v of a head, the MLP's input, the final norm's."""
    node, qkv = split_receiver(receiver)
    parsed = parse_node(node)
    if parsed.kind == "head" and qkv is not None and parsed.layer is not None:
        return hook_name(qkv, parsed.layer)
    if parsed.kind == "mlp" and parsed.layer is not None:
        return mlp_input_hook(bridge, parsed.layer)
    return final_input_hook(bridge)


def _record(bridge: TransformerBridge, tokens: Tokens, names: list[str]) -> dict[str, torch.Tensor]:
    store: dict[str, torch.Tensor] = {}

    def keep(name: str) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            store[name] = x.detach().clone()
        return hook

    hooks: FwdHooks = [(n, keep(n)) for n in names]
    bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return store


# --- sweeps: every head as the sole sender ----------------------------------------------------------------
@dataclass
class PathPatchSweep:
    """Per-sender-head effect into a receiver set. values: [n_layers, n_heads] mean metric after patching
    (NaN where the head has no edge into the receivers); clean / corrupt: mean metric of the plain runs."""

    receivers: list[str]
    values: Float[torch.Tensor, "layer head"]
    clean: float
    corrupt: float

    @property
    def delta(self) -> Float[torch.Tensor, "layer head"]:
        """values - clean (negative: the path carries behaviour that the corruption removes)."""
        return self.values - self.clean

    @property
    def normalised(self) -> Float[torch.Tensor, "layer head"]:
        """(values - clean) / (clean - corrupt): -1 = the path alone turns clean into corrupt behaviour."""
        denom = self.clean - self.corrupt
        # clean == corrupt: the task shows no behaviour to normalise by, so the ratio is undefined.
        return self.delta / denom if abs(denom) > 1e-9 else torch.full_like(self.values, float("nan"))

    def records(self) -> list[dict[str, str | int | float]]:
        out: list[dict[str, str | int | float]] = []
        normalised, delta = self.normalised, self.delta
        for layer in range(self.values.shape[0]):
            for head in range(self.values.shape[1]):
                out.append({"sender": head_name(layer, head), "layer": layer, "head": head,
                            "metric": float(self.values[layer, head]), "delta": float(delta[layer, head]),
                            "normalised": float(normalised[layer, head]),
                            "value": float(normalised[layer, head])})
        return out

    @classmethod
    def weighted_mean(cls, sweeps: Sequence[PathPatchSweep], weights: Sequence[int]) -> PathPatchSweep:
        """The sweeps of several prompt groups (e.g. one per token length) as one, each weighted by its
        number of prompts: the mean over all prompts, since every group's values are group means."""
        if not sweeps or len(sweeps) != len(weights):
            raise GraphError(f"weighted_mean needs one weight per sweep, got {len(sweeps)} sweeps, {len(weights)} weights")
        if any(s.receivers != sweeps[0].receivers for s in sweeps):
            raise GraphError("cannot combine path-patching sweeps into different receivers")
        total = float(sum(weights))
        values = sum((s.values * w for s, w in zip(sweeps, weights, strict=True)), torch.zeros_like(sweeps[0].values))
        clean = sum(s.clean * w for s, w in zip(sweeps, weights, strict=True))
        corrupt = sum(s.corrupt * w for s, w in zip(sweeps, weights, strict=True))
        return cls(sweeps[0].receivers, values / total, clean / total, corrupt / total)


def feeding_heads(graph: Graph, receivers: list[str]) -> list[tuple[int, int]]:
    """(layer, head) of every head with a direct edge into at least one of `receivers`, in forward order.

    Every sender earlier in the forward order than a receiver feeds it (graph.py), so these are the heads
    before the latest receiver."""
    reach = max(graph.senders_before(graph.receiver_index[r]) for r in receivers)
    heads = (parse_node(s) for s in graph.senders[:reach])
    return [(p.layer, p.head) for p in heads if p.kind == "head" and p.layer is not None and p.head is not None]


@torch.no_grad()
def path_patch_sweep(engine: MaskedEdgeEngine, receivers: str | list[str], clean: Tokens, corrupt: Tokens,
                     metric: MetricFn, *, chunk: int = 16, advance: Advance | None = None) -> PathPatchSweep:
    """Every head as the sole sender into `receivers`, `chunk` senders per batched masked forward.

    advance: called with the number of senders done after each chunk (a progress bar's `advance`);
    without it the sweep shows its own bar.
    """
    if chunk < 1:
        raise GraphError(f"chunk must be at least 1 (senders per forward pass), got {chunk}")
    graph, model = engine.graph, engine.model
    receiver_names = resolve_receivers(graph, receivers)
    heads = feeding_heads(graph, receiver_names)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    clean_metric = float(metric(model.logits(clean)).mean())
    corrupt_metric = float(metric(model.logits(corrupt)).mean())
    values = torch.full((graph.shape.n_layers, graph.shape.n_heads), float("nan"))
    if advance is None:
        from circuitlab.progress import progress_bar

        with progress_bar(len(heads), f"path patching into {', '.join(split_patterns(receivers))}") as own:
            _sweep_chunks(engine, heads, receiver_names, clean, ablated, metric, chunk, values, own)
    else:
        _sweep_chunks(engine, heads, receiver_names, clean, ablated, metric, chunk, values, advance)
    return PathPatchSweep(receiver_names, values, clean_metric, corrupt_metric)


def _sweep_chunks(engine: MaskedEdgeEngine, heads: list[tuple[int, int]], receivers: list[str], clean: Tokens,
                  ablated: torch.Tensor, metric: MetricFn, chunk: int, values: torch.Tensor, advance: Advance) -> None:
    """Fill values[layer, head] with the mean metric of each head's path patch, `chunk` heads per forward."""
    for start in range(0, len(heads), chunk):
        part = heads[start:start + chunk]
        coeff = torch.stack([path_coefficients(engine.graph, [head_name(*lh)], receivers) for lh in part])
        logits = engine.run(clean, coeff, ablated)  # [k, batch, pos, vocab]
        for (layer, head), lg in zip(part, logits, strict=True):
            values[layer, head] = float(metric(lg).mean())
        advance(len(part))
