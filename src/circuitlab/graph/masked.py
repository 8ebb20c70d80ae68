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
(read), final_norm_in or unembed_in (logits receiver input). This works on HF-backed and native
(boot_native) bridges: causal or bidirectional attention, sliding windows, RMSNorm / LayerNorm / no norm,
pre and post norms, rotary or learned positions, GQA, Q/K norms. See docs/METHODS.md, "Masked-edge runs
and ablations".

Self-check: building an engine checks, once per model (`self_check`), that the masked run with every
edge kept equals the plain forward and the one with every edge ablated equals the corrupt forward on a
short probe, that the recomputed attention of every layer equals the forward's, and that the config's
`attention_dir` agrees with the mask the forward applies. Any failure is a GraphError, and an engine
that failed is never built, so no analysis returns numbers from it.

Several coefficient sets ([k, n_edges]) run as one forward on a k-times repeated batch. Coefficients may
require grad; the result is then differentiable with respect to them.
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
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

Tokens = Int[torch.Tensor, "batch pos"]
Coefficients = Float[torch.Tensor, "*k edge"]  # [n_edges] or [k, n_edges]
SenderOutputs = Float[torch.Tensor, "sender batch_or_1 pos d_model"]
HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
# run_with_hooks' own parameter type (a list is invariant, so a list of (str, HookFn) would not match it).
FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]


def mlp_input_hook(bridge: TransformerBridge, layer: int) -> str:
    """The hook holding layer `layer`'s MLP input: the pre-MLP norm's input where the block has one."""
    name = hook_name("mlp_in", layer)
    return name if name in bridge.hook_dict else hook_name("mlp_in_raw", layer)


def final_input_hook(bridge: TransformerBridge) -> str:
    """The hook holding the logits' input (the final norm's input, else the unembedding's)."""
    name = hook_name("final_norm_in")
    return name if name in bridge.hook_dict else hook_name("unembed_in")


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
        self.masks: tuple[str, ...] = ()  # each layer's mask kind, as the self-check probed it
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

    # --- masked runs ----------------------------------------------------------------------------------
    def run(
        self,
        tokens: Tokens,
        coefficients: Coefficients,
        ablated: SenderOutputs,
    ) -> Float[torch.Tensor, "*k batch pos vocab"]:
        """Logits [batch, pos, vocab] for coefficients [n_edges], or [k, batch, pos, vocab] for [k, n_edges].

        ablated: the senders' ablated outputs (ablation.ablated_outputs), batch dimension = batch or 1.
        """
        self.model.check_tokens(tokens)
        flat = coefficients.ndim == 1
        coeff = self.graph.check_coefficients(coefficients)
        ablated = self._check_ablated(ablated, tokens)
        k, (batch, n_pos) = coeff.shape[0], tokens.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and coeff.requires_grad):
            state = _RunState(self, coeff, ablated, k, batch)
            logits = self.bridge.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=state.hooks(), return_type="logits")
        logits = logits.view(k, batch, n_pos, -1)
        return logits[0] if flat else logits

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
    """The hooks of one masked run and what they share: this run's sender-output differences so far."""

    def __init__(self, engine: MaskedEdgeEngine, coeff: Float[torch.Tensor, "k edge"], ablated: SenderOutputs,
                 k: int, batch: int):
        self.engine, self.graph = engine, engine.graph
        self.k, self.batch = k, batch
        g = self.graph
        # one_minus[k, s, r] = 1 - c on real edges, 0 elsewhere: how much of (out_s - abl_s) r loses.
        self.one_minus = torch.zeros(k, g.n_senders, g.n_receivers, dtype=coeff.dtype)
        self.one_minus[:, g.edge_src, g.edge_dst] = 1.0 - coeff
        self.ablated = ablated  # [sender, batch|1, pos, d_model]
        # This run's out_s - abl_s, laid out [k, sender, batch*pos*d_model] so that a receiver group's delta
        # is one batched matmul. Without grad a preallocated buffer is filled in place; with grad the
        # chunks are kept and concatenated (in-place writes would invalidate saved tensors).
        self.track_grad = torch.is_grad_enabled() and coeff.requires_grad
        self.buffer: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []
        self.n_done = 0
        self.prefix_sum: torch.Tensor | None = None  # [k, batch*pos*d]: sum of all diffs so far
        self.shape = torch.Size()  # [k*batch, pos, d_model], set by the input sender
        self.resid: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None  # [query, key] mask the forward applied in this layer
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def hooks(self) -> FwdHooks:
        out: FwdHooks = []
        for layer in range(self.graph.shape.n_layers):
            out.append((hook_name("resid_pre", layer), self._resid_pre(layer)))
            if self.engine.layers[layer].uses_hf_rotary:
                out.append((hook_name("rot_cos", layer), self._keep("cos")))
                out.append((hook_name("rot_sin", layer), self._keep("sin")))
            out.append((hook_name("pattern", layer), self._pattern()))
            out.append((hook_name("z", layer), self._attention(layer)))
            if not self.graph.shape.attn_only:
                mlp_in = mlp_input_hook(self.engine.bridge, layer)
                out.append((mlp_in, self._receiver_input(self.graph.mlp_receiver(layer))))
                out.append((hook_name("mlp_out", layer), self._mlp_out(layer)))
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
                self.buffer = diff.new_empty(self.k, self.graph.n_senders, diff.shape[-1])
            self.buffer[:, self.n_done:self.n_done + n] = diff
        total = diff.sum(dim=1)
        self.prefix_sum = total if self.prefix_sum is None else self.prefix_sum + total
        self.n_done += n
        self.shape = outputs.shape[1:]

    def _delta(self, receivers: slice) -> Float[torch.Tensor, "receiver k_batch pos d_model"]:
        """sum_s (1 - c_{s,r}) (out_s - abl_s) for receivers r: [n_receivers, k*batch, pos, d_model]."""
        if self.track_grad:
            diffs = torch.cat(self.chunks, dim=1) if len(self.chunks) > 1 else self.chunks[0]
        else:
            assert self.buffer is not None
            diffs = self.buffer[:, :self.n_done]
        weights = self.one_minus[:, :self.n_done, receivers]  # [k, n, r]
        # Every sender before a receiver feeds it, so sum_s (1-c) d_s = prefix_sum - sum_s c d_s: use the
        # form with fewer active senders (circuits and path patching have few), gathering only those rows.
        ablated_rows = (weights != 0).any(dim=2).any(dim=0)
        kept_rows = (weights != 1).any(dim=2).any(dim=0)
        complement = int(kept_rows.sum()) < int(ablated_rows.sum())  # fewer senders to multiply
        rows = kept_rows if complement else ablated_rows
        if complement:
            weights = 1.0 - weights
        n_rows = int(rows.sum())
        if 2 * n_rows > rows.numel():  # gathering most rows costs more than multiplying by the zeros
            total = torch.bmm(weights.transpose(1, 2), diffs)  # [k, r, batch*pos*d]
        else:
            index = torch.nonzero(rows).flatten()
            total = torch.bmm(weights[:, index].transpose(1, 2), diffs[:, index])
        if complement:
            assert self.prefix_sum is not None
            total = self.prefix_sum.unsqueeze(1) - total
        n_r = total.shape[1]
        return total.view(self.k, n_r, self.batch, -1).transpose(0, 1).reshape(n_r, *self.shape)

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
            streams = self.resid.unsqueeze(0) - self._delta(self.graph.head_receivers(layer))
            new_z = attention.z(streams, self.cos, self.sin, self.visible)
            self.visible = None
            self._add_senders(attention.head_outputs(new_z))
            return new_z.to(z.dtype)
        return hook

    def _receiver_input(self, receiver: int) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return x - self._delta(slice(receiver, receiver + 1))[0]
        return hook

    def _mlp_out(self, layer: int) -> HookFn:
        def hook(x: torch.Tensor, hook: HookPoint) -> None:
            self._add_senders(x.unsqueeze(0))
        return hook


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


_VERDICTS: weakref.WeakKeyDictionary[Any, _Verdict] = weakref.WeakKeyDictionary()


def _fingerprint(bridge: TransformerBridge) -> tuple[Any, ...]:
    """What invalidates a verdict: the config's attention direction, and any in-place change of a weight
    (load_state_dict, fine-tuning) which bumps the parameter's version counter."""
    versions = sum(p._version for p in bridge.parameters())
    return getattr(bridge.cfg, "attention_dir", None), versions, len(list(bridge.parameters()))


def self_check(engine: MaskedEdgeEngine) -> None:
    """Check the engine against the model's own forward (module docstring), once per model: the verdict
    (and the attention scales the probe picked) is cached per bridge until its config's attention_dir or
    a weight changes. Raises GraphError saying what differs."""
    bridge = engine.bridge
    fingerprint = _fingerprint(bridge)
    verdict = _VERDICTS.get(bridge)
    if verdict is None or verdict.fingerprint != fingerprint:
        try:
            scales, masks = _run_self_check(engine)
            verdict = _Verdict(fingerprint, None, scales, masks)
        except GraphError as exc:
            verdict = _Verdict(fingerprint, str(exc), (), ())
        _VERDICTS[bridge] = verdict
    if verdict.error is not None:
        raise GraphError(f"{engine.model.spec}: the masked-edge engine failed its self-check, so no analysis on "
                         f"the edge graph can run on this model: {verdict.error}")
    for layer, scale, mask in zip(engine.layers, verdict.scales, verdict.masks, strict=True):
        layer.scale, layer.mask = scale, mask
    engine.masks = verdict.masks


def _probe_tokens(model: Model, seed: int) -> Tokens:
    n_pos = max(2, min(PROBE_POSITIONS, model.n_ctx))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (2, n_pos), generator=generator)


def _run_self_check(engine: MaskedEdgeEngine) -> tuple[tuple[float, ...], tuple[str, ...]]:
    model, bridge = engine.model, engine.bridge
    clean, corrupt = _probe_tokens(model, 0), _probe_tokens(model, 1)
    masks = _probe_layers(engine, clean)
    _check_attention_dir(bridge, masks)
    ablated = engine.sender_outputs(corrupt)
    n = engine.graph.n_edges
    with torch.no_grad():
        want_clean, want_corrupt = model.logits(clean), model.logits(corrupt)
        both = engine.run(clean, torch.stack([torch.ones(n), torch.zeros(n)]), ablated)
    for got, want, what in ((both[0], want_clean, "every edge kept vs the plain forward"),
                            (both[1], want_corrupt, "every edge ablated vs the corrupt forward")):
        tolerance = SELF_CHECK_EPS_FACTOR * torch.finfo(want.dtype).eps * float(want.abs().max())
        diff = float((got - want).abs().max())
        if not diff <= tolerance:  # also catches NaN
            raise GraphError(
                f"the masked run with {what} differs by {diff:.3g} in the logits (tolerance {tolerance:.3g}, "
                f"from the float resolution); masks probed per layer: {', '.join(masks)}"
            )
    return tuple(layer.scale for layer in engine.layers), masks


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
