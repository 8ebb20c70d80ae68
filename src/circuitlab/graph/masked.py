"""Masked-edge runs: the model with a coefficient c in [0, 1] on every edge of the graph.

Each receiver's input is  sum over its incoming edges of  c * out_s + (1 - c) * abl_s  plus the terms that
belong to no node (biases such as b_O), where out_s is the sender's output *in this same run* and abl_s its
ablated output (corrupt prompt, mean, zero or resample: see ablation.py). Because out_s is taken from this
run, an ablation upstream propagates downstream, as in ACDC and EAP-IG. Implementation (EAP-IG style): the
bridge's residual stream holds the sum of this run's sender outputs, so a receiver's input is that
residual minus  sum_s (1 - c_{s,r}) (out_s - abl_s).

Bridge hooks, by their site in `circuitlab.models.hooks`: resid_pre (read; layer 0 is the `input` sender),
rot_cos / rot_sin (read, HF rotary), pattern (read: the mask the forward applied in this run), z (replaced
by the per-head-input attention of attention.py), mlp_in or mlp_in_raw (MLP receiver input), mlp_out
(read), final_norm_in or unembed_in (logits receiver input), unembed_in (keeps only the read positions
when a run is given `positions`). This works on HF-backed and native
(boot_native) bridges: causal or bidirectional attention, sliding windows, RMSNorm / LayerNorm / no norm,
pre and post norms, rotary or learned positions, GQA, Q/K norms. See docs/METHODS.md, "Masked-edge runs
and ablations".

Self-check: building an engine checks, once per model (`self_check`), that the masked run with every
edge kept equals the plain forward and the one with every edge ablated equals the corrupt forward on a
short probe (and so does a run unembedding only the last position: `read_positions_hooks`), that the
recomputed attention of every layer equals the forward's, and that the config's
`attention_dir` agrees with the mask the forward applies. Any failure is a GraphError, and an engine
that failed is never built, so no analysis returns numbers from it.

Several coefficient sets ([k, n_edges]) run as one forward on a k-times repeated batch (`max_batch` rows
per forward at most). Coefficients may require grad; the result is then differentiable with respect to
them, at c = 1 included: the forward skips the terms whose weight 1 - c is 0, the backward does not
(`_EdgeMix`), so dm/dc at c = 1 is EAP's  (out_s - abl_s) . dm/d(input of r).

Restarted runs: a coefficient set that differs from "all kept" only on edges into receivers at layer >= r
leaves every node before layer r at its clean output. Given a `CleanRun` (`engine.record(tokens)`: one
plain forward recording every sender's output and every block's inputs), `run(..., record=...)` starts
at layer r: the senders before it enter as their recorded clean outputs, and only blocks r..L-1 (or only
the final norm and unembedding, r = L) run. In any run, a coefficient set that touches no head input of
a layer keeps the forward's own attention there instead of recomputing it per head (the same numbers to
float32 rounding, and the same whichever other sets share the forward). The self-check also replays the clean
run from a middle layer and compares a restarted run with the full one; if that fails (a block reads an
input the recording misses), `restart_error` says why and every run falls back to the full forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.attention import HeadwiseAttention, visible_keys
from circuitlab.graph.graph import Graph, GraphShape
from circuitlab.graph.replay import BlockCall as BlockCall  # re-exported: the record's and hooks' types
from circuitlab.graph.replay import FwdHooks as FwdHooks
from circuitlab.graph.replay import HookPoints, replay_blocks
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

Tokens = Int[torch.Tensor, "batch pos"]
Coefficients = Float[torch.Tensor, "*k edge"]  # [n_edges] or [k, n_edges]
SenderOutputs = Float[torch.Tensor, "sender batch_or_1 pos d_model"]
HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]


def mlp_input_hook(bridge: TransformerBridge, layer: int) -> str:
    """The hook holding layer `layer`'s MLP input: the pre-MLP norm's input where the block has one."""
    name = hook_name("mlp_in", layer)
    return name if name in bridge.hook_dict else hook_name("mlp_in_raw", layer)


def final_input_hook(bridge: TransformerBridge) -> str:
    """The hook holding the logits' input (the final norm's input, else the unembedding's)."""
    name = hook_name("final_norm_in")
    return name if name in bridge.hook_dict else hook_name("unembed_in")


@dataclass
class CleanRun:
    """One forward of `tokens`, recorded for restarted masked runs (`MaskedEdgeEngine.record`): the plain
    forward, or a masked one (`base` coefficients with the ablated outputs of `ablated_key`).

    outputs: every sender's output [sender, batch, pos, d_model] (graph order); calls: each block's
    (args, kwargs) from layer 0 on (residual first, then the attention mask, rotary tables, position ids
    the bridge passed); final: the logits receiver's input (final norm's input, else the unembedding's).
    """

    tokens: Tokens
    outputs: Float[torch.Tensor, "sender batch pos d_model"]
    calls: dict[int, BlockCall]
    final: Float[torch.Tensor, "batch pos d_model"]
    fingerprint: tuple[Any, ...]
    _diffs: tuple[tuple[Any, ...], torch.Tensor] | None = None
    base: Float[torch.Tensor, " edge"] | None = None  # a masked record's coefficients (None: every edge kept)
    ablated_key: tuple[Any, ...] | None = None  # and the ablated outputs it ran with

    def differences(self, ablated: SenderOutputs) -> Float[torch.Tensor, "sender batch_pos_d"]:
        """out_s - abl_s of every sender in this run, flattened per sender; cached for the last `ablated`
        (every restarted run of a sweep shares them)."""
        key = ablated_key(ablated)
        if self._diffs is None or self._diffs[0] != key:
            diffs = (self.outputs - ablated).reshape(self.outputs.shape[0], -1)
            self._diffs = (key, diffs)
        return self._diffs[1]


def ablated_key(ablated: SenderOutputs) -> tuple[Any, ...]:
    """Which ablated outputs these are: storage, shape and version (an in-place change bumps it)."""
    return (ablated.data_ptr(), tuple(ablated.shape), ablated._version)


class MaskedEdgeEngine:
    """Runs one model under edge coefficients. Build once per model (reads the attention weights)."""

    def __init__(self, model: Model, graph: Graph | None = None):
        """Reads the weights and runs the self-check (`self_check`: GraphError when the engine disagrees
        with the model's forward)."""
        self.model = model
        self.bridge: TransformerBridge = model.bridge
        shape = GraphShape.from_model(model)
        self.graph = graph if graph is not None else Graph(shape)
        if not self.graph.shape.compatible_with(shape):
            raise GraphError(
                f"graph is for a model with {self.graph.shape.describe()}, but {model.spec} "
                f"has {shape.describe()}; build the graph with Graph.from_model(model)"
            )
        self.layers = [HeadwiseAttention(self.bridge, layer) for layer in range(shape.n_layers)]
        self.final_hook = final_input_hook(self.bridge)
        # Hook names and points resolved once: the bridge rebuilds its alias table on every lookup.
        self.mlp_in_hooks = [mlp_input_hook(self.bridge, layer) for layer in range(shape.n_layers)]
        self.hook_points = HookPoints(self.bridge)
        self.masks: tuple[str, ...] = ()  # each layer's mask kind, as the self-check probed it
        # layer of each receiver (n_layers for logits): where a run touching it can restart
        g = self.graph
        self.receiver_layer = torch.tensor([g.node_layer(r.split("<")[0]) for r in g.receivers], dtype=torch.long)
        self.edge_layer = self.receiver_layer[g.edge_dst]
        self.restart_error: str | None = None  # why restarted runs are disabled on this model, if they are
        self_check(self)

    # --- plain runs -----------------------------------------------------------------------------------
    def sender_outputs(self, tokens: Tokens) -> Float[torch.Tensor, "sender batch pos d_model"]:
        """Every sender's output on `tokens` in a plain (unmasked) run, in forward order."""
        self.model.check_tokens(tokens)
        store: dict[str, torch.Tensor] = {}

        def keep(key: str) -> HookFn:
            def hook(x: torch.Tensor, hook: HookPoint) -> None:
                store[key] = x.detach()
            return hook

        hooks: FwdHooks = [(hook_name("resid_pre", 0), keep("input"))]
        for layer in range(self.graph.shape.n_layers):
            hooks.append((hook_name("z", layer), keep(f"z{layer}")))
            if not self.graph.shape.attn_only:
                hooks.append((hook_name("mlp_out", layer), keep(f"m{layer}")))
        with torch.no_grad():
            self.bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
            parts = [store["input"].unsqueeze(0)]
            for layer, attention in enumerate(self.layers):
                parts.append(attention.head_outputs(store[f"z{layer}"]))
                if not self.graph.shape.attn_only:
                    parts.append(store[f"m{layer}"].unsqueeze(0))
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def record(self, tokens: Tokens, coefficients: Float[torch.Tensor, " edge"] | None = None,
               ablated: SenderOutputs | None = None) -> CleanRun:
        """One forward of `tokens` recording what restarted runs need (`CleanRun`): the plain forward, or
        with `coefficients` ([n_edges]) and their `ablated` outputs the masked run, so that runs differing
        from it only on edges into late layers restart there (e.g. a circuit without one of its nodes)."""
        self.model.check_tokens(tokens)
        bridge, calls, final = self.bridge, {}, []

        def capture(layer: int) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                calls[layer] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))
            return hook

        def capture_final(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            final.append(args[0].detach())

        base = None if coefficients is None else self.graph.check_coefficients(coefficients.detach())
        if base is not None and (base.shape[0] != 1 or ablated is None):
            raise GraphError("a masked record takes one coefficient set [n_edges] and the ablated outputs its runs "
                             "will use (ablated=...)")
        head = bridge.ln_final if self.final_hook == hook_name("final_norm_in") else bridge.unembed
        handles = [bridge.blocks[layer].register_forward_pre_hook(capture(layer), with_kwargs=True)
                   for layer in range(self.graph.shape.n_layers)]
        handles.append(head.register_forward_pre_hook(capture_final))
        try:
            if base is None:
                return CleanRun(tokens.clone(), self.sender_outputs(tokens), calls, final[-1], _fingerprint(bridge))
            assert ablated is not None
            ablated = self._check_ablated(ablated, tokens)
            state = _RunState(self, base, ablated, 1, tokens.shape[0])
            bridge.run_with_hooks(tokens, fwd_hooks=state.hooks(), return_type=None)
        finally:
            for handle in handles:
                handle.remove()
        assert state.buffer is not None
        diffs = state.buffer[0]  # [sender, batch*pos*d]: this run's out_s - abl_s, kept exact for restarts
        outputs = diffs.view(self.graph.n_senders, tokens.shape[0], tokens.shape[1], -1) + ablated
        key = ablated_key(ablated)
        return CleanRun(tokens.clone(), outputs, calls, final[-1], _fingerprint(bridge), (key, diffs), base[0].clone(),
                        key)

    def first_receiver(self, layer: int) -> int:
        """The first receiver (backward index) a run restarted at `layer` feeds: layer's first head input,
        or the logits for layer = n_layers; 0 for a full run (layer 0)."""
        g = self.graph
        return g.head_receivers(layer).start if layer < g.shape.n_layers else g.n_receivers - 1

    def restart_layer(self, coefficients: Coefficients, base: Float[torch.Tensor, " edge"] | None = None) -> int:
        """The earliest layer holding a receiver with an incoming coefficient != base's (default 1) in any
        row ([n_edges] or [k, n_edges]); n_layers when only edges into the logits differ (or none)."""
        reference = 1.0 if base is None else base
        changed = (coefficients.detach() != reference).reshape(-1, self.graph.n_edges).any(dim=0)
        layers = self.edge_layer[changed]
        return int(layers.min()) if layers.numel() else self.graph.shape.n_layers

    # --- masked runs ----------------------------------------------------------------------------------
    def run(
        self,
        tokens: Tokens,
        coefficients: Coefficients,
        ablated: SenderOutputs,
        *,
        record: CleanRun | None = None,
        max_batch: int | None = None,
        positions: Int[torch.Tensor, "batch n_read"] | None = None,
    ) -> Float[torch.Tensor, "*k batch pos vocab"]:
        """Logits [batch, pos, vocab] for coefficients [n_edges], or [k, batch, pos, vocab] for [k, n_edges].

        ablated: the senders' ablated outputs (ablation.ablated_outputs), batch dimension = batch or 1.
        record: `self.record(tokens)`; with it, rows run from `restart_layer` of the coefficients (the
        earliest changed receiver layer) instead of layer 0. Not used when the coefficients require grad
        (the gradient of every edge, upstream ones included, needs the full run).
        max_batch: at most this many rows (coefficient sets x prompts, at least one set) per forward.
        positions: only these positions' logits ([*k, batch, n_read, vocab]); only they are unembedded
        (`read_positions_hooks`; the unembedding dominates a run restarted late).
        """
        self.model.check_tokens(tokens)
        flat = coefficients.ndim == 1
        coeff = self.graph.check_coefficients(coefficients)
        ablated = self._check_ablated(ablated, tokens)
        if max_batch is not None and max_batch < 1:
            raise GraphError(f"max_batch must be at least 1 (rows per masked forward), got {max_batch}")
        if record is not None:
            self._check_record(record, tokens, ablated)
        if positions is not None and (positions.ndim != 2 or positions.shape[0] != tokens.shape[0]
                                      or bool((positions < 0).any()) or bool((positions >= tokens.shape[1]).any())):
            raise GraphError(f"positions must be [batch ({tokens.shape[0]}), n_read] indices below {tokens.shape[1]}, "
                             f"got shape {tuple(positions.shape)}")
        k, batch = coeff.shape[0], tokens.shape[0]
        per_forward = k if max_batch is None else max(1, max_batch // batch)
        parts = [self._forward(tokens, coeff[first:first + per_forward], ablated, record, positions)
                 for first in range(0, k, per_forward)]
        logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return logits[0] if flat else logits

    def _forward(self, tokens: Tokens, coeff: Float[torch.Tensor, "k edge"], ablated: SenderOutputs,
                 record: CleanRun | None, positions: Int[torch.Tensor, "batch n_read"] | None,
                 ) -> Float[torch.Tensor, "k batch pos vocab"]:
        k, batch = coeff.shape[0], tokens.shape[0]
        rows = None if positions is None else positions.repeat(k, 1)
        grad = torch.is_grad_enabled() and coeff.requires_grad
        start = 0
        if record is not None and not grad and self.restart_error is None:
            start = self.restart_layer(coeff, record.base)
        with torch.set_grad_enabled(grad):
            state = _RunState(self, coeff, ablated, k, batch, start=start, record=record)
            if start == 0:
                hooks = state.hooks() + ([] if rows is None else read_positions_hooks(rows))
                logits = self.bridge.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=hooks, return_type="logits")
            else:
                assert record is not None
                logits = self._run_from(state, record, start, rows)
        return logits.view(k, batch, logits.shape[1], -1)

    def _run_from(self, state: _RunState, record: CleanRun, start: int,
                  rows: Int[torch.Tensor, "kbatch n_read"] | None) -> Float[torch.Tensor, "kbatch pos vocab"]:
        """Blocks start..L-1 on k copies of the recorded residual entering block `start`, under the
        state's hooks; then the logits receiver's delta, the final norm and the unembedding (of `rows`'
        positions only, when given)."""
        n_layers, batch, k = self.graph.shape.n_layers, record.final.shape[0], state.k
        x = (record.calls[start][0][0] if start < n_layers else record.final).repeat(k, 1, 1)
        with self.hook_points.installed(state.hooks()):  # the resid_pre hooks set state.resid per block
            x = replay_blocks(self.hook_points, record.calls, x, start, batch=batch, k=k)
        delta = state._delta(slice(self.graph.n_receivers - 1, self.graph.n_receivers))
        x = x if delta is None else x - delta[0]
        return self.final_logits(x if rows is None else gather_positions(x, rows))

    def final_logits(self, resid: Float[torch.Tensor, "rows pos d_model"]) -> Float[torch.Tensor, "rows pos vocab"]:
        """The bridge's final norm (recomputed on `resid`, the logits receiver's input) and unembedding,
        with final-logit soft-capping (cfg.output_logits_soft_cap > 0) as the model applies it."""
        normed = self.bridge.ln_final(resid) if self.final_hook == hook_name("final_norm_in") else resid
        logits = self.bridge.unembed(normed)
        cap = float(getattr(self.model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    def _check_record(self, record: CleanRun, tokens: Tokens, ablated: SenderOutputs) -> None:
        if record.tokens.shape != tokens.shape or not torch.equal(record.tokens, tokens):
            raise GraphError("the recorded clean run is for other tokens; record the tokens of this run with "
                             "engine.record(tokens)")
        if record.fingerprint != _fingerprint(self.bridge):
            raise GraphError("the model changed (a weight or its attention config) since the clean run was "
                             "recorded; record it again with engine.record(tokens)")
        if record.ablated_key is not None and record.ablated_key != ablated_key(ablated):
            raise GraphError("the masked run was recorded with other ablated outputs; record it again with "
                             "engine.record(tokens, coefficients, ablated) for the ablated outputs of this run")

    def _check_ablated(self, ablated: SenderOutputs, tokens: Tokens) -> SenderOutputs:
        want = (self.graph.n_senders, tokens.shape[1], self.graph.shape.d_model or ablated.shape[-1])
        ok = (ablated.ndim == 4 and (ablated.shape[0], ablated.shape[2], ablated.shape[3]) == want
              and ablated.shape[1] in (1, tokens.shape[0]))
        if not ok:
            raise GraphError(
                f"ablated sender outputs must have shape [{want[0]}, batch ({tokens.shape[0]}) or 1, {want[1]}, "
                f"{want[2]}], got {tuple(ablated.shape)}; build them with ablated_outputs(engine, ...) for these tokens"
            )
        return ablated.detach()


class _RunState:
    """The hooks of one masked run and what they share: this run's sender-output differences so far.

    Senders before block `start` (a restarted run) enter once as the recorded clean differences, shared
    by the k rows ([n, batch*pos*d]); the others as this run's, per row ([k, n, batch*pos*d])."""

    def __init__(self, engine: MaskedEdgeEngine, coeff: Float[torch.Tensor, "k edge"], ablated: SenderOutputs,
                 k: int, batch: int, *, start: int = 0, record: CleanRun | None = None):
        self.engine, self.graph = engine, engine.graph
        self.k, self.batch, self.start = k, batch, start
        g = self.graph
        # one_minus[k, s, r - r0] = 1 - c on real edges, 0 elsewhere: how much of (out_s - abl_s) r loses. A
        # restarted run holds only the receivers from its layer on (the others are not run): r0, their first.
        self.r0 = engine.first_receiver(start)
        into = g.edge_dst >= self.r0
        self.one_minus = torch.zeros(k, g.n_senders, g.n_receivers - self.r0, dtype=coeff.dtype)
        self.one_minus[:, g.edge_src[into], g.edge_dst[into] - self.r0] = 1.0 - coeff[:, into]
        self.ablated = ablated  # [sender, batch|1, pos, d_model]
        # This run's out_s - abl_s, laid out [k, sender, batch*pos*d_model] so that a receiver group's delta
        # is one batched matmul. Without grad a preallocated buffer is filled in place; with grad the
        # chunks are kept (in-place writes would invalidate saved tensors) and mixed by `_EdgeMix`.
        self.track_grad = torch.is_grad_enabled() and coeff.requires_grad
        self.buffer: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []
        self.n_base = 0  # senders before block `start`: recorded, not run
        self.base: torch.Tensor | None = None  # [n_base, batch*pos*d]
        self._base_sum: torch.Tensor | None = None  # [1, batch*pos*d], computed when first needed
        if start > 0:
            assert record is not None
            n_layers = g.shape.n_layers
            self.n_base = g.sender_block(start).start if start < n_layers else g.n_senders
            self.base = record.differences(ablated)[:self.n_base]
            self.shape = torch.Size((k * batch, *record.outputs.shape[2:]))
        else:
            self.shape = torch.Size()  # [k*batch, pos, d_model], set by the input sender
        self.n_done = self.n_base
        self.prefix_sum: torch.Tensor | None = None  # [k, batch*pos*d]: sum of this run's diffs so far
        self.resid: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None  # [query, key] mask the forward applied in this layer
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def hooks(self) -> FwdHooks:
        out: FwdHooks = []
        for layer in range(self.start, self.graph.shape.n_layers):
            out.append((hook_name("resid_pre", layer), self._resid_pre(layer)))
            if self.engine.layers[layer].uses_hf_rotary:
                out.append((hook_name("rot_cos", layer), self._keep("cos")))
                out.append((hook_name("rot_sin", layer), self._keep("sin")))
            out.append((hook_name("pattern", layer), self._pattern()))
            out.append((hook_name("z", layer), self._attention(layer)))
            if not self.graph.shape.attn_only:
                mlp_in = self.engine.mlp_in_hooks[layer]
                out.append((mlp_in, self._receiver_input(self.graph.mlp_receiver(layer))))
                out.append((hook_name("mlp_out", layer), self._mlp_out(layer)))
        if self.start == 0:  # a restarted run applies the logits' delta itself (MaskedEdgeEngine._run_from)
            out.append((self.engine.final_hook, self._receiver_input(self.graph.n_receivers - 1)))
        return out

    def _add_senders(self, outputs: Float[torch.Tensor, "n k_batch pos d_model"]) -> None:
        """outputs [n, k*batch, pos, d_model] of the next n senders in forward order."""
        n = outputs.shape[0]
        ablated = self.ablated[self.n_done:self.n_done + n].unsqueeze(1)  # [n, 1, batch|1, pos, d]
        diff = outputs.reshape(n, self.k, self.batch, *outputs.shape[2:]) - ablated
        diff = diff.reshape(n, self.k, -1).transpose(0, 1)  # [k, n, batch*pos*d]
        if self.track_grad:
            self.chunks.append(diff)
        else:
            if self.buffer is None:
                self.buffer = diff.new_empty(self.k, self.graph.n_senders - self.n_base, diff.shape[-1])
            live = self.n_done - self.n_base
            self.buffer[:, live:live + n] = diff
        total = diff.sum(dim=1)
        self.prefix_sum = total if self.prefix_sum is None else self.prefix_sum + total
        self.n_done += n
        self.shape = outputs.shape[1:]

    def _delta(self, receivers: slice) -> Float[torch.Tensor, "receiver k_batch pos d_model"] | None:
        """sum_s (1 - c_{s,r}) (out_s - abl_s) for receivers r: [n_receivers, k*batch, pos, d_model]; None
        when every weight is 0 and nothing needs a gradient (the receivers read the plain residual)."""
        weights = self.one_minus[:, :self.n_done, self._local(receivers)]  # [k, n, r]
        total = None
        if self.base is not None:
            total = _sparse_mix(weights[:, :self.n_base], self.base.unsqueeze(0), self._get_base_sum)
        live = weights[:, self.n_base:]
        if self.track_grad:
            mixed = _EdgeMix.apply(live, *self.chunks)
        elif self.buffer is not None:
            prefix_sum = self.prefix_sum
            mixed = _sparse_mix(live, self.buffer[:, :self.n_done - self.n_base], lambda: prefix_sum)
        else:
            mixed = None
        if mixed is not None:
            total = mixed if total is None else total + mixed
        if total is None:
            return None
        n_r = total.shape[1]
        return total.view(self.k, n_r, self.batch, -1).transpose(0, 1).reshape(n_r, *self.shape)

    def _local(self, receivers: slice) -> slice:
        """Graph receiver indices as columns of `one_minus` (which starts at receiver r0)."""
        return slice(receivers.start - self.r0, receivers.stop - self.r0)

    def _get_base_sum(self) -> torch.Tensor:
        if self._base_sum is None:
            assert self.base is not None
            self._base_sum = self.base.sum(0, keepdim=True)
        return self._base_sum

    def _keep(self, attr: str) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            setattr(self, attr, x)
        return hook

    def _pattern(self) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            self.visible = visible_keys(x)
        return hook

    def _resid_pre(self, layer: int) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            if layer == 0:
                self._add_senders(x.unsqueeze(0))  # the input node's output is the embedding
            self.resid = x
        return hook

    def _attention(self, layer: int) -> HookFn:
        attention = self.engine.layers[layer]

        def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            assert self.resid is not None
            if self.visible is None:
                raise GraphError(f"layer {layer}: the bridge's attention fired no hook_pattern before hook_z, so the "
                                 "mask its forward applies cannot be read; this attention module is not supported")
            receivers = self.graph.head_receivers(layer)
            delta = self._delta(receivers)
            if delta is None:  # every head reads the plain residual: the forward's own attention is the answer
                new_z = z
            else:
                new_z = attention.z(self.resid.unsqueeze(0) - delta, self.cos, self.sin, self.visible).to(z.dtype)
                if not self.track_grad:
                    # Rows (coefficient sets) that touch no head input here keep the forward's own z, so a
                    # row's logits never depend on which other rows share its forward.
                    touched = (self.one_minus[:, :, self._local(receivers)] != 0).flatten(1).any(dim=1)
                    if not bool(touched.all()):
                        rows = touched.repeat_interleave(self.batch).view(-1, *([1] * (z.ndim - 1)))
                        new_z = torch.where(rows, new_z, z)
            self.visible = None
            self._add_senders(attention.head_outputs(new_z))
            return new_z
        return hook

    def _receiver_input(self, receiver: int) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            delta = self._delta(slice(receiver, receiver + 1))
            return x if delta is None else x - delta[0]
        return hook

    def _mlp_out(self, layer: int) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            self._add_senders(x.unsqueeze(0))
        return hook


def gather_positions(x: Float[torch.Tensor, "rows pos *rest"],
                     positions: Int[torch.Tensor, "rows n_read"]) -> torch.Tensor:
    """x at `positions`, row by row ([rows, n_read, *rest])."""
    return x[torch.arange(x.shape[0]).unsqueeze(1), positions]


def read_positions_hooks(positions: Int[torch.Tensor, "rows n_read"]) -> FwdHooks:
    """Hooks making a forward unembed only `positions` (row by row): its logits are [rows, n_read, vocab].

    The rows are gathered at the unembedding's input, after the final norm, on every model. The final norm
    acts per position too, but a wrapped model may reshape between the two (HF GPT-2 views the hidden
    states as [batch, pos, d_model] right after ln_f), so fewer positions there break its forward. The
    unembedding (and any soft cap after it) acts per position: the read logits are unchanged, the others
    are never computed."""
    def gather(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return gather_positions(x, positions)
    return [(hook_name("unembed_in"), gather)]


def _weighted(weights: Float[torch.Tensor, "k n r"], diffs: Float[torch.Tensor, "k_or_1 n x"]) -> torch.Tensor:
    """sum_n weights[k, n, r] diffs[k, n, :] -> [k, r, x]; diffs shared by the k rows when its first dim is 1."""
    k, n, r = weights.shape
    if diffs.shape[0] == 1 and k > 1:
        return (weights.transpose(1, 2).reshape(k * r, n) @ diffs[0]).view(k, r, -1)
    return torch.bmm(weights.transpose(1, 2), diffs)


def _sparse_mix(weights: Float[torch.Tensor, "k n r"], diffs: Float[torch.Tensor, "k_or_1 n x"],
                diff_sum: Callable[[], Float[torch.Tensor, "k_or_1 x"] | None]) -> Float[torch.Tensor, "k r x"] | None:
    """sum_n weights[k, n, r] diffs[., n] multiplying only the senders (rows) that matter; None if none does.

    Every sender before a receiver feeds it, so sum_s w d = diff_sum() - sum_s (1 - w) d: use the form with
    fewer active senders (circuits and path patching have few), gathering only those rows. diff_sum is
    called only when that form is chosen."""
    if weights.shape[1] == 0:
        return None
    ablated_rows = (weights != 0).any(dim=2).any(dim=0)
    n_ablated = int(ablated_rows.sum())
    if n_ablated == 0:
        return None
    kept_rows = (weights != 1).any(dim=2).any(dim=0)
    complement = int(kept_rows.sum()) < n_ablated  # fewer senders to multiply
    rows = kept_rows if complement else ablated_rows
    if complement:
        weights = 1.0 - weights
    n_rows = int(rows.sum())
    if 2 * n_rows > rows.numel():  # gathering most rows costs more than multiplying by the zeros
        total = _weighted(weights, diffs)
    elif n_rows == 0:
        total = torch.zeros(weights.shape[0], weights.shape[2], diffs.shape[-1], dtype=diffs.dtype)
    else:
        index = torch.nonzero(rows).flatten()
        total = _weighted(weights[:, index], diffs[:, index])
    if complement:
        whole = diff_sum()
        assert whole is not None
        total = whole.unsqueeze(1) - total
    return total


class _EdgeMix(torch.autograd.Function):
    """sum_s w[k, s, r] d_s over the senders' difference chunks, with a sparse forward and a dense backward.

    At c = 1 (w = 1 - c = 0) the forward needs no product at all, but dm/dw = d_s . dm/d(input of r) is
    not 0: it is EAP's score. The backward computes it for every edge from the saved chunks (no
    concatenated copy); the gradient to the chunks, w . dm/d(input), only where w != 0."""

    @staticmethod
    def forward(ctx: Any, weights: Float[torch.Tensor, "k n r"], *chunks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, *chunks)
        k, _, r = weights.shape
        total = chunks[0].new_zeros(k, r, chunks[0].shape[-1]) if chunks else weights.new_zeros(k, r, 0)
        first = 0
        for chunk in chunks:
            w = weights[:, first:first + chunk.shape[1]]
            first += chunk.shape[1]
            if bool((w != 0).any()):
                total += torch.bmm(w.transpose(1, 2), chunk)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, *chunks = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.cat([torch.bmm(chunk, grad.transpose(1, 2)) for chunk in chunks], dim=1)
        grads: list[torch.Tensor | None] = []
        first = 0
        for i, chunk in enumerate(chunks):
            w = weights[:, first:first + chunk.shape[1]]
            first += chunk.shape[1]
            grads.append(torch.bmm(w, grad) if ctx.needs_input_grad[i + 1] and bool((w != 0).any()) else None)
        return (grad_w, *grads)


# --- the self-check --------------------------------------------------------------------------------------
PROBE_POSITIONS = 8  # long enough to see causal vs bidirectional; the mask of longer runs is read per run
# Logits of the masked run vs the plain forward: the same float sums regrouped (sender outputs summed in
# another order, attention recomputed from the weights). Measured <= 8 eps * max|logit| on the toy models
# and SmolLM2's 30 layers; 256 eps leaves a 32x margin, while a wrong mask, scale or norm moves the logits
# by more than 1e-3 relative (a drifted causal flag: 1.0 absolute).
SELF_CHECK_EPS_FACTOR = 256
# Per layer, z recomputed from the same residual: one layer's regrouping, far below the logits' bound.
LAYER_EPS_FACTOR = 256


@dataclass(frozen=True)
class _Verdict:
    fingerprint: tuple[Any, ...]
    error: str | None
    scales: tuple[float, ...]
    masks: tuple[str, ...]
    restart_error: str | None = None


_VERDICTS: weakref.WeakKeyDictionary[Any, _Verdict] = weakref.WeakKeyDictionary()


def _fingerprint(bridge: TransformerBridge) -> tuple[Any, ...]:
    """What invalidates a verdict or a recorded run: the config's attention direction, any in-place change of
    a weight (load_state_dict, fine-tuning) which bumps the parameter's version counter, and a parameter or
    module swapped for another (the count and the identities change).

    Every restarted run checks it, so it walks the module tree with an explicit stack: `parameters()` nests
    one generator per tree level and cost a sixth of a restarted forward on an 8-layer toy model."""
    versions, identity, seen, visited = 0, 0, set(), set()
    stack: list[torch.nn.Module] = [bridge]
    while stack:
        module = stack.pop()
        if id(module) in visited:  # a module registered under two names (aliases) is walked once
            continue
        visited.add(id(module))
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                versions += param._version
                identity ^= id(param)
        stack.extend(child for child in module._modules.values() if child is not None)
    return getattr(bridge.cfg, "attention_dir", None), versions, len(seen), identity


def self_check(engine: MaskedEdgeEngine) -> None:
    """Check the engine against the model's own forward (module docstring), once per model: the verdict
    (and the attention scales the probe picked) is cached per bridge until its config's attention_dir or
    a weight changes. Raises GraphError saying what differs."""
    bridge = engine.bridge
    fingerprint = _fingerprint(bridge)
    verdict = _VERDICTS.get(bridge)
    if verdict is None or verdict.fingerprint != fingerprint:
        try:
            scales, masks, restart_error = _run_self_check(engine)
            verdict = _Verdict(fingerprint, None, scales, masks, restart_error)
        except GraphError as exc:
            verdict = _Verdict(fingerprint, str(exc), (), ())
        _VERDICTS[bridge] = verdict
    if verdict.error is not None:
        raise GraphError(f"{engine.model.spec}: the masked-edge engine failed its self-check, so no analysis on "
                         f"the edge graph can run on this model: {verdict.error}")
    for layer, scale, mask in zip(engine.layers, verdict.scales, verdict.masks, strict=True):
        layer.scale, layer.mask = scale, mask
    engine.masks = verdict.masks
    engine.restart_error = verdict.restart_error


def _probe_tokens(model: Model, seed: int) -> Tokens:
    n_pos = max(2, min(PROBE_POSITIONS, model.n_ctx))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (2, n_pos), generator=generator)


def _run_self_check(engine: MaskedEdgeEngine) -> tuple[tuple[float, ...], tuple[str, ...], str | None]:
    model, bridge = engine.model, engine.bridge
    clean, corrupt = _probe_tokens(model, 0), _probe_tokens(model, 1)
    masks = _probe_layers(engine, clean)
    _check_attention_dir(bridge, masks)
    ablated = engine.sender_outputs(corrupt)
    n = engine.graph.n_edges
    last = torch.full((clean.shape[0], 1), clean.shape[1] - 1)
    with torch.no_grad():
        want_clean, want_corrupt = model.logits(clean), model.logits(corrupt)
        both = engine.run(clean, torch.stack([torch.ones(n), torch.zeros(n)]), ablated)
        try:
            read = engine.run(clean, torch.ones(n), ablated, positions=last)
        except RuntimeError as exc:
            raise GraphError(f"a masked run unembedding only the last position fails ({exc}): the model does "
                             "more than a per-position unembedding after the unembedding's input") from exc
    for got, want, what in ((both[0], want_clean, "every edge kept vs the plain forward"),
                            (both[1], want_corrupt, "every edge ablated vs the corrupt forward"),
                            (read, want_clean[:, -1:], "every edge kept, the last position only, vs the plain forward")):
        tolerance = SELF_CHECK_EPS_FACTOR * torch.finfo(want.dtype).eps * float(want.abs().max())
        diff = float((got - want).abs().max())
        if not diff <= tolerance:  # also catches NaN
            raise GraphError(
                f"the masked run with {what} differs by {diff:.3g} in the logits (tolerance {tolerance:.3g}, "
                f"from the float resolution); masks probed per layer: {', '.join(masks)}"
            )
    return tuple(layer.scale for layer in engine.layers), masks, _check_restart(engine, clean, ablated)


def _check_restart(engine: MaskedEdgeEngine, tokens: Tokens, ablated: SenderOutputs) -> str | None:
    """Restarted runs against full ones on the probe: every edge into the middle layer and into the logits
    ablated (a restart there replays blocks L/2..L-1), and every edge into the logits only (a restart at
    the final norm). Returns what differs (restarts are then disabled) or None. The self-check's
    tolerance: the same sums, grouped differently (recorded clean differences instead of this run's)."""
    n_layers = engine.graph.shape.n_layers
    middle = max(1, n_layers // 2)
    into_logits = engine.edge_layer == n_layers
    coefficients = torch.stack([(~((engine.edge_layer == middle) | into_logits)).float(), (~into_logits).float()])
    with torch.no_grad():
        record = engine.record(tokens)
        full = engine.run(tokens, coefficients, ablated)
        for row, want in zip(coefficients, full, strict=True):
            got = engine.run(tokens, row, ablated, record=record)
            tolerance = SELF_CHECK_EPS_FACTOR * torch.finfo(want.dtype).eps * float(want.abs().max())
            diff = float((got - want).abs().max())
            if not diff <= tolerance:
                return (f"a masked run restarted at layer {engine.restart_layer(row)} from the recorded clean run "
                        f"differs from the full run by {diff:.3g} in the logits (tolerance {tolerance:.3g}): the "
                        "model's blocks read an input the recording does not capture")
    return None


def _probe_layers(engine: MaskedEdgeEngine, tokens: Tokens) -> tuple[str, ...]:
    """One plain run: per layer, pick the attention scale from the forward's pattern and check the
    recomputed z against the forward's. Returns each layer's mask kind."""
    store: dict[str, torch.Tensor] = {}

    def keep(key: str) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            store[key] = x.detach()
        return hook

    n_layers = engine.graph.shape.n_layers
    hooks: FwdHooks = []
    for layer in range(n_layers):
        for site in ("resid_pre", "pattern", "z"):
            hooks.append((hook_name(site, layer), keep(f"{site}{layer}")))
        if engine.layers[layer].uses_hf_rotary:
            hooks += [(hook_name("rot_cos", layer), keep(f"cos{layer}")), (hook_name("rot_sin", layer), keep(f"sin{layer}"))]
    with torch.no_grad():
        engine.bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
        masks = []
        for layer, attention in enumerate(engine.layers):
            if f"pattern{layer}" not in store:
                raise GraphError(f"layer {layer}: the bridge's attention fires no hook_pattern, so the mask its "
                                 "forward applies cannot be read; this attention module is not supported")
            resid, pattern = store[f"resid_pre{layer}"], store[f"pattern{layer}"]
            cos, sin = store.get(f"cos{layer}"), store.get(f"sin{layer}")
            masks.append(attention.probe(resid, pattern, cos, sin))
            streams = resid.unsqueeze(0).expand(3 * attention.n_heads, *resid.shape)
            got, want = attention.z(streams, cos, sin, visible_keys(pattern)), store[f"z{layer}"]
            tolerance = LAYER_EPS_FACTOR * torch.finfo(want.dtype).eps * float(want.abs().max())
            diff = float((got - want).abs().max())
            if not diff <= tolerance:
                raise GraphError(f"layer {layer}: the recomputed attention output z differs from the forward's by "
                                 f"{diff:.3g} (tolerance {tolerance:.3g}) although the patterns agree; the values "
                                 "path (v projection, norm or bias) is not what the forward computes")
    return tuple(masks)


def _check_attention_dir(bridge: TransformerBridge, masks: tuple[str, ...]) -> None:
    """The config's attention_dir must describe the mask the forward applies: analyses that read the
    config would otherwise disagree with the model (e.g. a field changed after loading)."""
    direction = getattr(bridge.cfg, "attention_dir", None)
    if direction is None:
        return
    if direction == "causal":
        wrong = [(layer, kind) for layer, kind in enumerate(masks) if kind == "bidirectional"]
    else:
        wrong = [(layer, kind) for layer, kind in enumerate(masks) if kind != "bidirectional"]
    if wrong:
        layer, kind = wrong[0]
        raise GraphError(
            f"the model's config says attention_dir={direction!r} but layer {layer}'s forward applies {kind} "
            "attention (read from its attention pattern on a probe): the config has drifted from the loaded "
            "model; reload the model instead of editing bridge.cfg"
        )
