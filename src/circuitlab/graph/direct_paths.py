"""Path patching into the logits in two forward passes: the direct path of every sender at once.

The direct path of a sender s into the logits runs through nothing but the final norm and the
unembedding. With the edge s -> logits carrying the corrupt output and every other edge kept, every node
computes its clean output, so the masked run (graph/masked.py) reads at the final norm

    resid_final = clean resid_final + (corrupt out_s - clean out_s)

and the patched logits are  unembed(ln_final(that))  with the norm recomputed (not frozen), exactly as
the masked engine does. So one clean and one corrupt forward record every sender's output (the input's
embedding, each head's output from hook_z as the engine computes it, each MLP's mlp_out) at the positions
the metric reads, and each sender then costs one norm and one unembedding of those few rows: no forward
pass at all (docs/METHODS.md, "Path patching").

A head's output is the masked engine's (`HeadwiseAttention.head_outputs`): z_h W_O[h], or on models with
a post-attention norm (Gemma-2/3) the head's share of the normalised attention output. Before reporting,
the sweep checks itself against the plain forward (`check_reconstruction`): in the clean and the corrupt
run, input + every head + every MLP + the output biases must rebuild the recorded final residual stream
at the scored positions to float32 rounding, else GraphError, never a silently wrong number.

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
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.attention import HeadwiseAttention
from circuitlab.graph.graph import Graph
from circuitlab.graph.masked import FwdHooks, MaskedEdgeEngine, final_input_hook, gather_positions
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

    def records(self) -> list[dict[str, Any]]:  # the parent's columns, plus head None for input/MLPs
        out: list[dict[str, Any]] = list(super().records())
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
    graph order, the final norm's input [batch, n_read, d_model], and `constant` [d_model]: the terms the
    blocks add that belong to no node (each attention's output bias b_O, or its post-norm's bias)."""

    outputs: Float[torch.Tensor, "sender batch n_read d_model"]
    final: Float[torch.Tensor, "batch n_read d_model"]
    constant: Float[torch.Tensor, " d_model"]


HeadOutputs = Callable[[Float[torch.Tensor, "batch n_read head d_head"]], Float[torch.Tensor, "head batch n_read d_model"]]


def head_outputs_fn(model: Model, layer: int) -> tuple[HeadOutputs, Float[torch.Tensor, " d_model"] | None]:
    """How layer `layer`'s heads write into the residual stream, as the masked-edge engine computes it:
    `HeadwiseAttention.head_outputs` (z_h W_O[h], or with a post-attention norm the head's share of the
    normalised output), and the layer's term of no node (b_O, or the post-norm's bias beta).

    Where the engine refuses the layer's attention (e.g. attention sinks), its output is still
    z_h W_O[h] + b_O; `check_reconstruction` then tells whether that holds for this model."""
    try:
        attention = HeadwiseAttention(model.bridge, layer)
    except GraphError:
        attn = model.bridge.blocks[layer].attn
        W_O = attn.W_O.detach()
        b_O = getattr(attn, "b_O", None)

        def plain(z: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bphe,hed->hbpd", z, W_O.to(z.dtype))
        return plain, None if b_O is None else b_O.detach()
    bias = attention.post_norm.beta if attention.post_norm is not None else attention.b_O
    return attention.head_outputs, bias


def head_decomposition(model: Model, graph: Graph) -> list[tuple[HeadOutputs, torch.Tensor | None]]:
    """`head_outputs_fn` of every layer (reads the weights: build once per sweep)."""
    return [head_outputs_fn(model, layer) for layer in range(graph.shape.n_layers)]


@torch.no_grad()
def record_direct(model: Model, graph: Graph, tokens: Tokens, positions: Positions,
                  heads: list[tuple[HeadOutputs, torch.Tensor | None]] | None = None) -> DirectRecord:
    """One forward of `tokens` with read-only hooks: the input (resid_pre of layer 0), each head's output
    (hook_z through `head_outputs_fn`; b_O belongs to no node), each MLP's mlp_out, and the final norm's
    input, all at `positions`. heads: `head_decomposition(model, graph)`, built here when not given."""
    model.check_tokens(tokens)
    heads = heads if heads is not None else head_decomposition(model, graph)
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
    final = store["final"]
    parts = [store["input"].unsqueeze(0)]
    constant = torch.zeros(final.shape[-1], dtype=final.dtype)
    for layer, (outputs_of, bias) in enumerate(heads):
        # the post-norm share is a ratio of this run's own norms: computed at the read positions only,
        # which is exact since the norm acts per position
        parts.append(outputs_of(store[f"z{layer}"]).to(final.dtype))
        if bias is not None:
            constant = constant + bias.to(final.dtype)
        if not attn_only:
            parts.append(store[f"m{layer}"].unsqueeze(0))
    return DirectRecord(torch.cat(parts, dim=0), final, constant)


# The identity  final = input + sum of head outputs + sum of MLP outputs + constant  holds exactly in real
# numbers; in float32 the two sides are the same sum in a different order (the bridge adds each block's
# output to the stream, we add the senders in graph order; o_proj sums over heads inside one matmul, we
# per head), so they differ by a few eps times the magnitude of the terms at that position (per position:
# SmolLM2's first position carries terms ~1000x larger than the others). Measured <= 1.35 eps * max_d
# sum_s |out_s| per position on the toy, tiny HF (Llama, GPT-2, Gemma-3) models and SmolLM2-135M's 30
# layers; 64 eps leaves a ~47x margin, while a wrong decomposition (z W_O on a post-norm model) misses by
# ~0.5 relative.
RECONSTRUCTION_EPS_FACTOR = 64


def check_reconstruction(record: DirectRecord, run: str) -> None:
    """The fast path's self-check (docs/METHODS.md, "Path patching"): the senders' outputs plus the terms
    of no node must rebuild the recorded final residual stream at the read positions, else the per-sender
    numbers would be silently wrong. GraphError saying which run's reconstruction failed and by how much."""
    eps = torch.finfo(record.final.dtype).eps
    terms = (record.outputs.abs().sum(dim=0) + record.constant.abs()).amax(dim=-1)  # [batch, n_read]
    error = (record.outputs.sum(dim=0) + record.constant - record.final).abs().amax(dim=-1)
    excess = error - RECONSTRUCTION_EPS_FACTOR * eps * terms
    worst = int(excess.nan_to_num(float("inf")).argmax())  # NaN counts as a failure
    diff, tolerance = float(error.flatten()[worst]), RECONSTRUCTION_EPS_FACTOR * eps * float(terms.flatten()[worst])
    if not diff <= tolerance:  # also catches NaN
        row, read = divmod(worst, error.shape[1])
        raise GraphError(
            f"the {run} run's final residual stream (the final norm's input) is not the sum of its senders' "
            f"outputs (input + every head + every MLP + the output biases): at prompt {row}, scored position "
            f"{read}, they differ by {diff:.3g} (tolerance {tolerance:.3g}, from the float resolution). The "
            "direct-path fast path does not know how this model's heads write into the residual stream, so it "
            "reports nothing; use method 'masked' (--method masked), whose engine checks itself against the "
            "model's forward"
        )


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
    `masked_sweep(engine, 'logits', ...)` up to float32 rounding (tested). GraphError before any number
    when the senders' outputs do not rebuild either run's final residual (`check_reconstruction`).

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
    heads = head_decomposition(model, graph)
    base = record_direct(model, graph, clean, positions, heads)
    bad = record_direct(model, graph, corrupt, positions, heads)
    check_reconstruction(base, "clean")  # before any number is reported
    check_reconstruction(bad, "corrupt")
    clean_metric = float(readout(final_logits(model, base.final, columns)).mean())
    corrupt_metric = float(readout(final_logits(model, bad.final, columns)).mean())
    index = torch.tensor([graph.sender_index[s] for s in names], dtype=torch.long)
    diffs = bad.outputs[index] - base.outputs[index]  # [n, batch, n_read, d]
    values = empty_values(graph)
    other: dict[str, float] = {}
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
    values = empty_values(graph)
    other: dict[str, float] = {}
    for start in range(0, len(senders), chunk):
        part = senders[start:start + chunk]
        coeff = torch.stack([path_coefficients(graph, [s], receivers) for s in part])
        logits = engine.run(clean, coeff, ablated)  # [k, batch, pos, vocab]
        for sender, lg in zip(part, logits, strict=True):
            fill_value(values, other, sender, float(metric(lg).mean()))
        if advance is not None:
            advance(len(part))
    return SenderSweep(list(receivers), values, clean_metric, corrupt_metric, other)
