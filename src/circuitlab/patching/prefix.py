"""Prefix reuse under causal attention: recompute only the positions a patch can reach
(docs/METHODS.md, "Activation patching").

In a causal model a patch at position p of layer l cannot change anything at positions < p: their residual
stream, keys and values at every layer are those of the unpatched (receiving) run. So a patched run only
needs positions p..n-1 from block l on, attending to the receiving run's recorded keys and values of
positions 0..p-1. `SuffixForward` computes exactly that: each block on the suffix only, its attention over
[recorded prefix keys | suffix keys], rotary positions offset by p. The position-wise parts (norms, the q/k/v/o
projections, the MLP, the final norm and unembedding) are the bridge's own modules; only the attention mix is
written here, because the bridge's attention cannot take keys of positions it was not given.

Whether this is valid is decided from what the model computes, once per model (`prefix_reuse`):
1. causality: changing the tokens after position p leaves the logits of positions < p unchanged;
2. the suffix forward reproduces the bridge's own logits at every suffix position.
A model that fails either check (bidirectional attention, an attention variant this module does not
reproduce) takes the full restart instead. tests/unit/patching/test_prefix.py and
tests/integration/patching/test_patching.py pin the suffix forward to the plain bridge.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from circuitlab.models.hooks import hook_name, layer_hook_names
from circuitlab.models.model import Model
from circuitlab.patching.restart import LayerRestart, unembed

# A tap sees each patchable activation of the start block (site name, suffix-only tensor in the bridge
# hook's layout) and returns the tensor to use: the patch is applied there.
Tap = Callable[[str, torch.Tensor], torch.Tensor]

# Decoder blocks that compute x + attn(ln1(x)), then x + mlp(ln2(x)) (the bridge names their parts alike).
_STANDARD_BLOCKS = ("NativeBlock", "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
# Attention features the suffix attention does not reproduce (HF attribute names); any one -> full restart.
_HF_UNSUPPORTED = ("attn_logit_softcapping", "sinks", "sliding_window", "key_multiplier", "q_norm", "k_norm")
_CHECK_POS, _SPLIT = 8, 4  # the one-time check: 8 random tokens, the tail changed from position 4 on
# The check's tolerance: the suffix reorders float32 sums (different matmul shapes) in every layer, which moves
# logits by a few hundred eps at most; a wrong mask, rotary offset or non-causal model moves them by O(1).
_CHECK_EPS = 1024


@dataclass(frozen=True)
class PrefixSupport:
    """Whether prefix reuse is valid for a model, and why not when it is not."""

    ok: bool
    reason: str = ""


_SUPPORT: weakref.WeakKeyDictionary[torch.nn.Module, PrefixSupport] = weakref.WeakKeyDictionary()


def prefix_reuse(model: Model) -> PrefixSupport:
    """Decide once per model (cached) whether patched runs may reuse the unpatched prefix; see the module doc."""
    cached = _SUPPORT.get(model.bridge)
    if cached is None:
        cached = _check(model)
        _SUPPORT[model.bridge] = cached
    return cached


def _check(model: Model) -> PrefixSupport:
    reason = _structure_problem(model)
    if reason:
        return PrefixSupport(False, reason)
    bridge = model.bridge
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.d_vocab, (1, _CHECK_POS), generator=gen)
    changed = tokens.clone()
    changed[:, _SPLIT:] = (tokens[:, _SPLIT:] + 1 + torch.randint(0, model.d_vocab - 1, (1, _CHECK_POS - _SPLIT),
                                                                  generator=gen)) % model.d_vocab
    restart = LayerRestart(model)
    resid_names = set(layer_hook_names("resid_pre", model.n_layers))
    with torch.no_grad():
        with restart.capture():
            logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in resid_names)
        other = bridge(changed, return_type="logits")
    tol = _CHECK_EPS * torch.finfo(logits.dtype).eps * max(1.0, float(logits.abs().max()))
    if (logits[:, :_SPLIT] - other[:, :_SPLIT]).abs().max() > tol:
        return PrefixSupport(False, "changing later tokens changes earlier logits (attention is not causal)")
    suffix = SuffixForward(model, restart)
    receiving = {hook_name("resid_pre", j): cache[hook_name("resid_pre", j)] for j in range(model.n_layers)}
    group = SuffixGroup(_SPLIT, torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        for layer in sorted({0, model.n_layers - 1}):
            out = suffix.run(layer, [group], receiving, "check")
            if (out - logits[:, _SPLIT:]).abs().max() > tol:
                return PrefixSupport(False, "the suffix forward does not reproduce this model's logits")
    return PrefixSupport(True)


def _structure_problem(model: Model) -> str:
    """Why the suffix forward cannot compute this architecture ('' when it can)."""
    for block in model.bridge.blocks:
        original = getattr(block, "original_component", None)
        if type(original).__name__ not in _STANDARD_BLOCKS:
            return f"block type {type(original).__name__} is not a standard pre-norm decoder block"
        attn = block.attn
        if _attention_kind(attn) is None:
            return f"attention {type(attn).__name__} is not one the suffix forward reproduces"
    return ""


def _attention_kind(attn: Any) -> str | None:
    """'native' (TransformerLens' native model), 'rope' (HF rotary attention), None (unsupported)."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.sources.native.model import NativeAttention

    original = attn.original_component
    cfg = attn.config
    if any(getattr(cfg, flag, False) for flag in ("gated_q_proj", "rotary_adjacent_pairs",
                                                   "rotary_interleaved_cos_sin", "qk_norm_after_rope")):
        return None
    if isinstance(original, NativeAttention):
        return "native" if float(original.attn_scores_soft_cap) <= 0 else None
    if type(attn) is PositionEmbeddingsAttentionBridge:
        if any(getattr(original, name, None) is not None for name in _HF_UNSUPPORTED):
            return None
        if "gate" in attn.submodules or "q_norm" in attn.submodules:
            return None
        rope = getattr(getattr(original, "config", None), "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
            return None
        return "rope"
    return None


@dataclass(frozen=True)
class SuffixGroup:
    """Rows of one restart point: prompts `rows` of the receiving run, recomputed from position `start`.

    `tap` sees the start block's activations of these rows (suffix positions only) and places the patch.
    """

    start: int
    rows: Int[torch.Tensor, " rows"]
    tap: Tap | None = None


class SuffixForward:
    """Blocks layer..L-1 on positions start..n-1 only, attending to recorded prefix keys and values.

    One call runs several restart points at once: their suffix tokens are packed into one sequence, so the
    position-wise work (norms, projections, MLP, unembedding) is one matmul per weight for every group,
    and only the attention mix runs per group. `restart` must have captured one forward of the prompts'
    length: its recorded block inputs give the rotary tables / position ids of every position. Prefix keys
    and values are computed once per receiving run and layer from that run's recorded block inputs
    (`receiving`, hook name -> [batch, pos, d_model]).
    """

    def __init__(self, model: Model, restart: LayerRestart) -> None:
        self.model, self.bridge, self.restart = model, model.bridge, restart
        self.kinds = [_attention_kind(block.attn) for block in self.bridge.blocks]
        self._kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def run(
        self, layer: int, groups: list[SuffixGroup], receiving: dict[str, torch.Tensor], run: str,
        answer_pos: list[Int[torch.Tensor, " rows"]] | None = None,
    ) -> Float[torch.Tensor, "rows pos_out vocab"]:
        """Logits of every group's rows (group-major), restarted at (layer, group.start), taps at `layer`.

        `run` names the receiving run ("clean", "corrupt") for the key/value cache. With `answer_pos` (one
        tensor of absolute positions per group, each >= its start) only those positions are unembedded
        (pos_out 1); without it, a single group's logits at positions start..n-1.
        """
        resid = receiving[hook_name("resid_pre", layer)]
        n_pos = int(resid.shape[1])
        shapes = [(len(g.rows), n_pos - g.start) for g in groups]
        x = _pack([resid[g.rows, g.start:] for g in groups])
        for index in range(layer, len(self.bridge.blocks)):
            keys, values = self._prefix(run, index, receiving)
            prefix = [(keys[g.rows, :, :g.start], values[g.rows, :, :g.start]) for g in groups]
            x = self._block(index, x, groups, shapes, prefix, first=index == layer)
        if answer_pos is None:
            return unembed(self.bridge, x.view(*shapes[0], -1))
        offsets = torch.tensor([0, *[r * w for r, w in shapes]]).cumsum(0)
        flat = torch.cat([offsets[i] + torch.arange(r) * w + (a - g.start)
                          for i, (g, (r, w), a) in enumerate(zip(groups, shapes, answer_pos, strict=True))])
        return unembed(self.bridge, x[0, flat].unsqueeze(1))

    # --- one block --------------------------------------------------------------------------------------
    def _block(
        self, index: int, x: torch.Tensor, groups: list[SuffixGroup], shapes: list[tuple[int, int]],
        prefix: list[tuple[torch.Tensor, torch.Tensor]], *, first: bool,
    ) -> torch.Tensor:
        """One block on packed suffix tokens x [1, tokens, d_model]; taps only in the first (patched) block."""
        block = self.bridge.blocks[index]

        def at(name: str, tensor: torch.Tensor) -> torch.Tensor:  # a packed resid-layout tensor
            if not first or all(g.tap is None for g in groups):
                return tensor
            parts = _unpack(tensor, shapes)
            return _pack([p if g.tap is None else g.tap(name, p) for g, p in zip(groups, parts, strict=True)])

        x = at("resid_pre", x)
        h = _norm(block, "ln1", x)
        d_head = int(self.model.cfg.d_head)
        qkv = [_unpack(part(h), shapes, d_head) for part in (block.attn.q, block.attn.k, block.attn.v)]
        z = []
        for g, (q, k, v), (keys, values) in zip(groups, zip(*qkv, strict=True), prefix, strict=True):
            tap = g.tap if first else None
            if tap is not None:
                q, k, v = tap("q", q), tap("k", k), tap("v", v)
            q, k = self._rotate(index, q, k, g.start)
            z_g = self._attend(index, q, torch.cat([keys, k], dim=2), torch.cat([values, v.transpose(1, 2)], dim=2),
                               g.start, tap)
            z.append((z_g if tap is None else tap("z", z_g)).flatten(2))
        x = x + at("attn_out", block.attn.o(_pack(z)))
        if getattr(block, "mlp", None) is None:  # attention-only
            return at("resid_post", x)
        x = at("resid_mid", x)
        return at("resid_post", x + at("mlp_out", block.mlp(_norm(block, "ln2", x))))

    def _rotate(self, index: int, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding at absolute positions start.. ([rows, pos, heads, d_head] -> [rows, heads, pos, d_head])."""
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        _, kwargs = self.restart.calls[index]  # type: ignore[index]
        original = self.bridge.blocks[index].attn.original_component
        if self.kinds[index] == "native":
            if original.rotary is None:
                return q, k
            return original.rotary.apply_rope(q, k, position_ids=kwargs["position_ids"][:1, start:])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = (t[:1, start:] for t in kwargs["position_embeddings"])
        return apply_rotary_pos_emb(q, k, cos, sin)

    def _attend(
        self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, tap: Tap | None,
    ) -> Float[torch.Tensor, "rows pos heads d_head"]:
        """Causal attention of suffix queries over all keys (query i sits at absolute position start + i)."""
        original = self.bridge.blocks[index].attn.original_component
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:  # grouped-query attention: query head h reads kv head h // groups
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = q @ keys.transpose(-2, -1)
        scores = scores / original.scale if self.kinds[index] == "native" else scores * original.scaling
        n_q, n_k = scores.shape[-2:]
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(diagonal=start)
        pattern = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        if tap is not None:
            pattern = tap("pattern", pattern)
        return (pattern @ values).transpose(1, 2)

    # --- recorded prefix ----------------------------------------------------------------------------------
    def _prefix(self, run: str, index: int, receiving: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [batch, kv_heads, pos, d_head] of the receiving run at block `index`."""
        key = (run, index)
        if key not in self._kv:
            resid = receiving[hook_name("resid_pre", index)]
            d_head = int(self.model.cfg.d_head)
            h = _norm(self.bridge.blocks[index], "ln1", resid)
            attn = self.bridge.blocks[index].attn
            k = attn.k(h).view(*resid.shape[:2], -1, d_head)
            v = attn.v(h).view(*resid.shape[:2], -1, d_head)
            _, k = self._rotate(index, k, k, 0)
            self._kv[key] = (k, v.transpose(1, 2))
        return self._kv[key]


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[rows_g, pos_g, ...] per group -> [1, sum rows_g * pos_g, features] (one token sequence)."""
    return torch.cat([p.reshape(1, -1, p[0, 0].numel()) for p in parts], dim=1)


def _unpack(x: torch.Tensor, shapes: list[tuple[int, int]], d_head: int | None = None) -> list[torch.Tensor]:
    """Inverse of `_pack`: [1, tokens, features] -> [rows_g, pos_g, features] (or [.., heads, d_head])."""
    sizes = [r * w for r, w in shapes]
    tail = (-1, d_head) if d_head else (-1,)
    return [part.reshape(r, w, *tail) for part, (r, w) in zip(x.split(sizes, dim=1), shapes, strict=True)]


def _norm(block: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(block, name, None)
    return x if norm is None else norm(x)
