"""Path patching into the logits in two forward passes: the direct path of every sender at once.

The direct path of a sender s into the logits runs through nothing but the final norm and the
unembedding. With the edge s -> logits carrying the corrupt output and every other edge kept, every node
computes its clean output, so the masked run (graph/masked.py) reads at the final norm

    resid_final = clean resid_final + (corrupt out_s - clean out_s)

and the patched logits are  unembed(ln_final(that))  with the norm recomputed (not frozen), exactly as
the masked engine does. So one clean and one corrupt forward record every sender's output (the input's
embedding, each head's  z_h W_O[h]  from hook_z, each MLP's mlp_out) at the positions the metric reads,
and each sender then costs one norm and one unembedding of those few rows: no forward pass at all
(docs/METHODS.md, "Path patching").

The metric reads only some positions (the answer position) and sometimes only some vocabulary columns
(a logit difference reads the answer and wrong tokens): `direct_logit_sweep` takes a `Readout` of the
logits at `positions` and, optionally, the `columns` it reads, and unembeds only those.

`masked_sweep` is the reference: the same senders, one masked-edge forward each (`chunk` per batch).
Both return a `SenderSweep`: the heads as a [layer, head] grid (a `PathPatchSweep`) plus the input and
MLP senders by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import FwdHooks, MaskedEdgeEngine, final_input_hook
from circuitlab.graph.naming import parse_node
from circuitlab.graph.path_patching import Advance, MetricFn, PathPatchSweep, path_coefficients
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint

Tokens = Int[torch.Tensor, "batch pos"]
Positions = Int[torch.Tensor, "batch n_read"]
ReadLogits = Float[torch.Tensor, "batch n_read vocab"]
Readout = Callable[[ReadLogits], Float[torch.Tensor, " batch"]]
"""The metric of logits read at `positions` (and `columns`): [batch, n_read, vocab or n_columns] -> [batch]."""


# --- the result ------------------------------------------------------------------------------------------
@dataclass
class SenderSweep(PathPatchSweep):
    """A `PathPatchSweep` (heads as a [layer, head] grid) plus the other senders: other['input'],
    other['m3'], ... hold their mean metric after patching (absent: not swept)."""

    other: dict[str, float] = field(default_factory=dict)

    def records(self) -> list[dict[str, str | int | float | None]]:
        out: list[dict[str, str | int | float | None]] = list(super().records())
        denom = self.clean - self.corrupt
        for name, value in self.other.items():
            parsed = parse_node(name)
            normalised = (value - self.clean) / denom if abs(denom) > 1e-9 else float("nan")
            out.append({"sender": name, "layer": -1 if parsed.layer is None else parsed.layer, "head": None,
                        "metric": value, "delta": value - self.clean, "normalised": normalised,
                        "value": normalised})
        return out

    @classmethod
    def weighted_mean(cls, sweeps: Sequence[PathPatchSweep], weights: Sequence[int]) -> SenderSweep:
        heads = PathPatchSweep.weighted_mean(sweeps, weights)
        total = float(sum(weights))
        names = [n for n in getattr(sweeps[0], "other", {}) if all(n in getattr(s, "other", {}) for s in sweeps)]
        other = {n: sum(s.other[n] * w for s, w in zip(sweeps, weights, strict=True)) / total  # type: ignore[attr-defined]
                 for n in names}
        return cls(heads.receivers, heads.values, heads.clean, heads.corrupt, other)


def feeding_senders(graph: Graph, receivers: list[str]) -> list[str]:
    """Every sender (input, heads, MLPs) with a direct edge into at least one receiver, in forward order."""
    reach = max(graph.senders_before(graph.receiver_index[r]) for r in receivers)
    return graph.senders[:reach]


def fill_value(sweep_values: torch.Tensor, other: dict[str, float], sender: str, value: float) -> None:
    parsed = parse_node(sender)
    if parsed.kind == "head" and parsed.layer is not None and parsed.head is not None:
        sweep_values[parsed.layer, parsed.head] = value
    else:
        other[sender] = value


def empty_values(graph: Graph) -> Float[torch.Tensor, "layer head"]:
    return torch.full((graph.shape.n_layers, graph.shape.n_heads), float("nan"))


# --- recording: every sender's output at the read positions --------------------------------------------
@dataclass
class DirectRecord:
    """One plain run, read at `positions`: every sender's output [sender, batch, n_read, d_model] in
    graph order and the final norm's input [batch, n_read, d_model]."""

    outputs: Float[torch.Tensor, "sender batch n_read d_model"]
    final: Float[torch.Tensor, "batch n_read d_model"]


def gather_positions(x: Float[torch.Tensor, "batch pos *rest"], positions: Positions) -> torch.Tensor:
    rows = torch.arange(x.shape[0]).unsqueeze(1)
    return x[rows, positions]


@torch.no_grad()
def record_direct(model: Model, graph: Graph, tokens: Tokens, positions: Positions) -> DirectRecord:
    """One forward of `tokens` with read-only hooks: the input (resid_pre of layer 0), each head's output
    z_h W_O[h] (hook_z; b_O belongs to no node), each MLP's mlp_out, and the final norm's input."""
    model.check_tokens(tokens)
    bridge = model.bridge
    store: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Callable[[torch.Tensor, HookPoint], None]:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            store[key] = gather_positions(x.detach(), positions)
        return hook

    n_layers, attn_only = graph.shape.n_layers, graph.shape.attn_only
    hooks: FwdHooks = [(hook_name("resid_pre", 0), keep("input")), (final_input_hook(bridge), keep("final"))]
    for layer in range(n_layers):
        hooks.append((hook_name("z", layer), keep(f"z{layer}")))
        if not attn_only:
            hooks.append((hook_name("mlp_out", layer), keep(f"m{layer}")))
    bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    parts = [store["input"].unsqueeze(0)]
    for layer in range(n_layers):
        W_O = bridge.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
        parts.append(torch.einsum("brhe,hed->hbrd", store[f"z{layer}"], W_O.to(store[f"z{layer}"].dtype)))
        if not attn_only:
            parts.append(store[f"m{layer}"].unsqueeze(0))
    return DirectRecord(torch.cat(parts, dim=0), store["final"])


@torch.no_grad()
def final_logits(model: Model, resid: Float[torch.Tensor, "rows n_read d_model"],
                 columns: Int[torch.Tensor, " n_columns"] | None = None) -> Float[torch.Tensor, "rows n_read vocab"]:
    """The bridge's final norm (recomputed on `resid`) and unembedding; only `columns` of the vocabulary
    when given. Final-logit soft-capping (cfg.output_logits_soft_cap > 0) is applied as the model does."""
    bridge = model.bridge
    normed = bridge.ln_final(resid) if final_input_hook(bridge) == hook_name("final_norm_in") else resid
    if columns is None:
        logits = bridge.unembed(normed)
    else:
        W_U = bridge.unembed.W_U.detach()[:, columns]
        b_U = getattr(bridge.unembed, "b_U", None)
        logits = normed @ W_U.to(normed.dtype)
        if b_U is not None:
            logits = logits + b_U.detach()[columns].to(normed.dtype)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    return torch.tanh(logits / cap) * cap if cap > 0 else logits


# --- the fast sweep -----------------------------------------------------------------------------------------
@torch.no_grad()
def direct_logit_sweep(model: Model, clean: Tokens, corrupt: Tokens, readout: Readout, positions: Positions, *,
                       columns: Int[torch.Tensor, " n_columns"] | None = None, senders: list[str] | None = None,
                       max_batch: int = 256, graph: Graph | None = None,
                       advance: Advance | None = None) -> SenderSweep:
    """Every sender (default: input, every head, every MLP) as the sole sender into the logits.

    Two plain forwards (clean, corrupt); then, `max_batch` rows (senders x prompts) at a time, the final
    norm and unembedding of  clean final + (corrupt out_s - clean out_s)  at `positions` only. Equals
    `masked_sweep(engine, 'logits', ...)` up to float32 rounding (tested).

    readout: the metric of logits [batch, n_read, vocab] read at `positions` [batch, n_read] (vocabulary
    restricted to `columns` when given). advance: a progress bar's advance(n), called per stack of senders.
    """
    if max_batch < 1:
        raise GraphError(f"max_batch must be at least 1 (rows per batched projection), got {max_batch}")
    graph = graph or Graph.from_model(model)
    names = senders if senders is not None else graph.senders
    unknown = [s for s in names if s not in graph.sender_index]
    if unknown:
        raise GraphError(f"unknown senders {unknown}; senders are 'input', heads 'a{{l}}.h{{h}}' and MLPs 'm{{l}}'")
    batch = clean.shape[0]
    if tuple(corrupt.shape) != tuple(clean.shape) or positions.shape[0] != batch:
        raise GraphError(f"clean {tuple(clean.shape)}, corrupt {tuple(corrupt.shape)} and positions "
                         f"{tuple(positions.shape)} must agree on batch (and clean/corrupt on length)")
    base = record_direct(model, graph, clean, positions)
    bad = record_direct(model, graph, corrupt, positions)
    clean_metric = float(readout(final_logits(model, base.final, columns)).mean())
    corrupt_metric = float(readout(final_logits(model, bad.final, columns)).mean())
    index = torch.tensor([graph.sender_index[s] for s in names], dtype=torch.long)
    diffs = bad.outputs[index] - base.outputs[index]  # [n, batch, n_read, d]
    values, other = empty_values(graph), {}
    per_stack = max(1, max_batch // batch)
    for start in range(0, len(names), per_stack):
        part = diffs[start:start + per_stack]
        resid = (base.final.unsqueeze(0) + part).flatten(0, 1)  # [k*batch, n_read, d]
        logits = final_logits(model, resid, columns).unflatten(0, (part.shape[0], batch))
        for sender, lg in zip(names[start:start + per_stack], logits, strict=True):
            fill_value(values, other, sender, float(readout(lg).mean()))
        if advance is not None:
            advance(part.shape[0])
    return SenderSweep(["logits"], values, clean_metric, corrupt_metric, other)


# --- the reference: one masked-edge run per sender -------------------------------------------------------
@torch.no_grad()
def masked_sweep(engine: MaskedEdgeEngine, receivers: list[str], clean: Tokens, corrupt: Tokens, metric: MetricFn,
                 senders: list[str], *, chunk: int = 16, advance: Advance | None = None) -> SenderSweep:
    """Each of `senders` as the sole sender into resolved `receivers`, one masked forward per sender
    (`chunk` per batched forward): the reference every fast path is tested against."""
    if chunk < 1:
        raise GraphError(f"chunk must be at least 1 (senders per forward pass), got {chunk}")
    graph, model = engine.graph, engine.model
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    clean_metric = float(metric(model.logits(clean)).mean())
    corrupt_metric = float(metric(model.logits(corrupt)).mean())
    values, other = empty_values(graph), {}
    for start in range(0, len(senders), chunk):
        part = senders[start:start + chunk]
        coeff = torch.stack([path_coefficients(graph, [s], receivers) for s in part])
        logits = engine.run(clean, coeff, ablated)  # [k, batch, pos, vocab]
        for sender, lg in zip(part, logits, strict=True):
            fill_value(values, other, sender, float(metric(lg).mean()))
        if advance is not None:
            advance(len(part))
    return SenderSweep(list(receivers), values, clean_metric, corrupt_metric, other)
