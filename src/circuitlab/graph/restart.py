"""Path patching into heads and MLPs by restarting at the receivers' layer, many senders per forward.

With only the edges  s -> R  cut (s one sender, R the receivers), every node before the earliest
receiver layer r computes exactly its clean output. So one recorded clean run gives, for every variant,
the residual entering block r and the keyword inputs every later block received (attention mask,
rotary tables, position ids); the sweep then runs only blocks r..L-1, on `max_batch` rows (senders x
prompts) at a time, and unembeds only the positions the metric reads (docs/METHODS.md, "Path patching").

Inside the restarted blocks each variant k (sender s_k) follows the masked-edge rule (graph/masked.py):
a receiver rho in R fed by s_k reads  resid - (out_{s_k} - corrupt out_{s_k}),  where out_{s_k} is s_k's
output in this run (its clean output when s_k lies before layer r); every other input is the plain
residual. Layers with head receivers compute attention per (head, q/k/v) input with the engine's
`HeadwiseAttention`; the other layers run the bridge's own blocks unchanged. Equals the full masked run
(`masked_sweep`) up to float32 rounding (tested on toy models and SmolLM2).

The block replay is the masked engine's (`replay.replay_blocks`, as in `MaskedEdgeEngine.run(record=...)`);
the variants stay their own. Each variant cuts one sender, so a variant keeps only its sender's difference
and patches with mask x difference, where the engine's restarted rows hold every sender's difference per
row ([k, senders, batch*pos*d_model]: up to gigabytes for a sweep of hundreds of senders on SmolLM2) and mix
them through [k, senders, receivers] weights; and the sweep unembeds only the metric's vocabulary
`columns`, where the engine returns every logit.

Self-checks: every sender's output, head outputs included (the post-norm share on Gemma-shaped models),
and the recomputed attention come from a `MaskedEdgeEngine`, whose self-check against the plain forward
ran when it was built, so this module has no decomposition of its own to check. What the engine does not
cover is the replay itself (blocks r..L-1 called on recorded inputs): `check_replay` replays the clean
run with no edge cut and requires the recorded final residual back before any number is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.attention import visible_keys
from circuitlab.graph.direct_paths import (
    Positions,
    Readout,
    SenderSweep,
    Tokens,
    empty_values,
    fill_value,
    final_logits,
    gather_positions,
)
from circuitlab.graph.masked import CleanRun, FwdHooks, MaskedEdgeEngine
from circuitlab.graph.naming import parse_node
from circuitlab.graph.path_patching import Advance
from circuitlab.graph.replay import replay_blocks
from circuitlab.models.hooks import hook_name

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint

Resid = Float[torch.Tensor, "rows pos d_model"]


def restart_layer(engine: MaskedEdgeEngine, receivers: list[str]) -> int:
    """The earliest layer holding a receiver (n_layers when the logits are the only receiver)."""
    layers = [parse_node(r.split("<")[0]).layer for r in receivers if r != "logits"]
    return min((layer for layer in layers if layer is not None), default=engine.graph.shape.n_layers)


# The replay calls the same blocks on the same inputs as the recorded forward, only outside it: the rows
# may differ by kernel choice, not by algorithm. Measured 0 on the toy models and SmolLM2; 64 eps of the
# largest residual entry at the position leaves room for a backend that reorders, while a dropped block
# input (mask, rotary tables, position ids) moves the residual by O(1) relative.
REPLAY_EPS_FACTOR = 64


@torch.no_grad()
def check_replay(engine: MaskedEdgeEngine, record: CleanRun, start: int, positions: Positions) -> None:
    """Replay blocks start..L-1 of the clean run with no edge cut: the final residual at `positions` must
    be the recorded one (float32 rounding), else GraphError: the bridge's blocks need an input the
    recording does not capture, and the restart cannot be trusted on this model."""
    n_layers = engine.graph.shape.n_layers
    if start >= n_layers:  # nothing replayed: the restart reads the recorded final residual itself
        return
    x = replay_blocks(engine.hook_points, record.calls, record.calls[start][0][0], start, batch=record.outputs.shape[1], k=1)
    got, want = gather_positions(x, positions), gather_positions(record.final, positions)
    error = (got - want).abs().amax(dim=-1)
    tolerance = REPLAY_EPS_FACTOR * torch.finfo(want.dtype).eps * want.abs().amax(dim=-1)
    if not bool((error <= tolerance).all()):  # also catches NaN
        worst = int((error - tolerance).nan_to_num(float("inf")).argmax())
        raise GraphError(
            f"replaying blocks {start}..{n_layers - 1} of the clean run from their recorded inputs does not give "
            f"back its final residual stream at the scored positions (max difference {float(error.max()):.3g}, "
            f"tolerance {float(tolerance.flatten()[worst]):.3g}, from the float resolution): the model's blocks "
            "read an input the restart does not record; use method 'masked' (--method masked)"
        )


class _Variants:
    """k stacked variants, variant i patching the edges sender[i] -> receivers: the masks of which
    receiver inputs each variant changes, and each variant's (this run's out - corrupt out)."""

    def __init__(self, engine: MaskedEdgeEngine, senders: list[str], receivers: list[str], record: CleanRun,
                 ablated: Float[torch.Tensor, "sender batch pos d_model"], start: int):
        graph = engine.graph
        self.engine, self.graph, self.k, self.batch = engine, graph, len(senders), record.outputs.shape[1]
        self.index = [graph.sender_index[s] for s in senders]
        self.ablated = ablated
        chosen = torch.zeros(graph.n_receivers, dtype=torch.bool)
        chosen[[graph.receiver_index[r] for r in receivers]] = True
        reach = torch.tensor([graph.senders_before(j) for j in range(graph.n_receivers)])
        # mask[j, i]: receiver j is patched in variant i (j in R and sender i has an edge into j)
        self.mask = (chosen.unsqueeze(1) & (torch.tensor(self.index).unsqueeze(0) < reach.unsqueeze(1))).float()
        upstream = graph.sender_block(start).start
        # variants whose sender lies before layer `start` know their difference already
        self.diff: list[torch.Tensor | None] = [
            record.outputs[s] - ablated[s] if s < upstream else None for s in self.index]

    def set_outputs(self, first: int, outputs: Float[torch.Tensor, "n rows pos d_model"]) -> None:
        """This run's outputs [n, k*batch, pos, d] of senders first..first+n-1 (graph order)."""
        for i, s in enumerate(self.index):
            if first <= s < first + outputs.shape[0]:
                rows = slice(i * self.batch, (i + 1) * self.batch)
                self.diff[i] = outputs[s - first, rows] - self.ablated[s]

    def delta(self, receivers: slice | list[int]) -> Float[torch.Tensor, "receiver rows pos d_model"] | None:
        """What each receiver loses per row: mask x diff, [n_receivers, k*batch, pos, d]; None if nothing."""
        mask = self.mask[receivers]  # [r, k]
        if not bool(mask.any()):
            return None
        parts: list[torch.Tensor | None] = []
        for i in range(self.k):
            diff = self.diff[i]
            if diff is None or not bool(mask[:, i].any()):
                parts.append(None)
                continue
            parts.append(mask[:, i].view(-1, 1, 1, 1).to(diff.dtype) * diff.unsqueeze(0))
        template = next(p for p in parts if p is not None)
        zeros = torch.zeros_like(template)
        return torch.cat([zeros if p is None else p for p in parts], dim=1)


@torch.no_grad()
def restart_sweep(engine: MaskedEdgeEngine, receivers: list[str], clean: Tokens, corrupt: Tokens, readout: Readout,
                  positions: Positions, senders: list[str], *, columns: Int[torch.Tensor, " n_columns"] | None = None,
                  max_batch: int = 256, advance: Advance | None = None) -> SenderSweep:
    """Each of `senders` as the sole sender into resolved `receivers`, restarting at the earliest receiver
    layer; `max_batch` rows (senders x prompts) per restarted forward. Two plain forwards (clean, corrupt)
    record what the restart needs. readout/positions/columns: as in `direct_logit_sweep`."""
    if max_batch < 1:
        raise GraphError(f"max_batch must be at least 1 (rows per restarted forward), got {max_batch}")
    engine.model.check_tokens(clean)
    graph = engine.graph
    start = restart_layer(engine, receivers)
    record = engine.record(clean)
    bad = engine.record(corrupt)
    check_replay(engine, record, start, positions)  # the engine's self-check covers the rest (module docstring)
    clean_metric = float(readout(final_logits(engine.model, gather_positions(record.final, positions), columns)).mean())
    corrupt_metric = float(readout(final_logits(engine.model, gather_positions(bad.final, positions), columns)).mean())
    values = empty_values(graph)
    other: dict[str, float] = {}
    batch = clean.shape[0]
    per_stack = max(1, max_batch // batch)
    for first in range(0, len(senders), per_stack):
        part = senders[first:first + per_stack]
        variants = _Variants(engine, part, receivers, record, bad.outputs, start)
        logits = _run_from(engine, variants, record, start, positions, columns)  # [k*batch, n_read, vocab]
        for sender, lg in zip(part, logits.unflatten(0, (len(part), batch)), strict=True):
            fill_value(values, other, sender, float(readout(lg).mean()))
        if advance is not None:
            advance(len(part))
    return SenderSweep(list(receivers), values, clean_metric, corrupt_metric, other)


def _run_from(engine: MaskedEdgeEngine, variants: _Variants, record: CleanRun, start: int, positions: Positions,
              columns: Int[torch.Tensor, " n_columns"] | None) -> Float[torch.Tensor, "rows n_read vocab"]:
    """Blocks start..L-1 on k stacked copies of the clean residual entering block `start`, with the
    variants' receiver inputs patched; logits at `positions` only."""
    graph, k = engine.graph, variants.k
    seen: list[torch.Tensor | None] = [None, None, None]  # this block's rotary cos, sin and visible keys
    start_resid = record.calls[start][0][0] if start < graph.shape.n_layers else record.final
    x = replay_blocks(engine.hook_points, record.calls, start_resid.repeat(k, 1, 1), start, batch=variants.batch, k=k,
                      layer_hooks=lambda layer, resid: _layer_hooks(engine, variants, layer, resid, seen))
    final = variants.delta([graph.n_receivers - 1])
    if final is not None:
        x = x - final[0]
    rows = positions.repeat(k, 1)
    return final_logits(engine.model, gather_positions(x, rows), columns)


def _layer_hooks(engine: MaskedEdgeEngine, variants: _Variants, layer: int, resid: Resid,
                 seen: list[torch.Tensor | None]) -> FwdHooks:
    """Hooks of one restarted block: rotary tables and the attention mask kept (as the masked engine
    does); with head receivers, z recomputed per (head, q/k/v) input; this layer's sender outputs
    recorded; the MLP receiver's input patched."""
    graph = engine.graph
    attention = engine.layers[layer]
    heads = graph.head_receivers(layer)
    block = graph.sender_block(layer)
    needs_heads = any(block.start <= s < block.start + graph.shape.n_heads for s in variants.index)
    hooks: FwdHooks = []

    def keep(slot: int) -> Callable[[torch.Tensor, HookPoint], None]:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            seen[slot] = visible_keys(x) if slot == 2 else x
        return hook

    def z_hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        delta = variants.delta(heads)
        if delta is not None:
            streams = resid.unsqueeze(0) - delta
            z = attention.z(streams, seen[0], seen[1], seen[2]).to(z.dtype)
        if needs_heads:
            variants.set_outputs(block.start, attention.head_outputs(z))
        return z

    if attention.uses_hf_rotary:
        hooks += [(hook_name("rot_cos", layer), keep(0)), (hook_name("rot_sin", layer), keep(1))]
    if bool(variants.mask[heads].any()):
        hooks.append((hook_name("pattern", layer), keep(2)))
    if needs_heads or bool(variants.mask[heads].any()):
        hooks.append((hook_name("z", layer), z_hook))
    if not graph.shape.attn_only:
        mlp = graph.mlp_receiver(layer)

        def mlp_in(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            delta = variants.delta([mlp])
            return x if delta is None else x - delta[0]

        def mlp_out(x: torch.Tensor, hook: HookPoint) -> None:
            variants.set_outputs(block.stop - 1, x.unsqueeze(0))

        if bool(variants.mask[mlp].any()):
            hooks.append((engine.mlp_in_hooks[layer], mlp_in))
        if any(s == block.stop - 1 for s in variants.index):
            hooks.append((hook_name("mlp_out", layer), mlp_out))
    return hooks
