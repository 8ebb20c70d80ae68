"""Attention of one layer with a separate residual input per (query head, q/k/v): the masked-edge fast path.

In a masked-edge run every head's q, k and v inputs are different mixtures of sender outputs, and under
GQA two heads of one kv group may read different k/v inputs (the graph is ungrouped, as in MIB). The
bridge cannot compute that, so this module recomputes the attention block from the loaded model's own
modules and weights: per stream pre-norm -> per-head projection (kv weights repeated per query head, the
grouping of HF's `repeat_kv`) -> Q/K norm -> rotary -> scaled scores -> soft-cap -> mask -> softmax -> z.

Every property is taken from what the loaded forward computes, never from config fields (which can
drift from the module that was built):

- the mask (causal, bidirectional, sliding window) is read from the bridge's own attention pattern of
  the same run: key j is visible to query i where the forward gave it a non-zero weight (`visible_keys`);
- rotary tables are the ones the forward used in the same run (HF: the layer's hook_cos / hook_sin),
  or the native model's own rotary module;
- the scale and the soft-cap are checked against the forward's pattern once per model
  (`probe`, called by the engine's self-check in masked.py), which picks the scale that reproduces it.

Post-attention norms (Gemma-2/3: the residual receives post_norm(attention output)): a head's output is
its share of the normalised attention output, post_norm being linear for a fixed per-position scale s:
head h contributes  g * C(z_h W_O[h]) * s  (g the norm's gain, C centring for a LayerNorm), with s the
scale of the same run. The shares sum to the block's output exactly, so a masked run with every edge
kept is the plain forward. See docs/METHODS.md, "Edge graph".

Out of reach (GraphError naming the property): attention sinks, Q/K norms over all heads at once or
after rotary, adjacent-pair (interleaved) rotary on HF models, gated queries, a post-attention norm
together with an output bias, and any pattern that is not softmax(scale * q.k) (ALiBi, relative
position biases): the probe reports the layer and what differs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import nn

from circuitlab.errors import GraphError
from circuitlab.models.hooks import hook_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Heads = Float[torch.Tensor, "batch head pos d_head"]
Rotary = Float[torch.Tensor, "batch pos d_head"]
Visible = Bool[torch.Tensor, "query key"]
Pattern = Float[torch.Tensor, "batch head query key"]


def _inner(module: nn.Module) -> nn.Module:
    """The wrapped torch module of a bridge component (bypasses the bridge's hook points)."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) else module


def _rotate_half(x: Heads) -> Heads:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def visible_keys(pattern: Pattern) -> Visible:
    """Which keys the forward let each query see: a non-zero weight in any batch row or head.

    Masked keys get exactly 0 (softmax of -inf or of the dtype's minimum underflows to 0). A visible key
    could underflow too only with a score gap above ~100 in every head and every row at once; its weight
    would then be below 1e-43 in the recomputation as well."""
    return (pattern.detach() != 0).flatten(0, -3).any(dim=0)


def mask_kind(visible: Visible) -> str:
    """'causal', 'bidirectional', 'sliding window W' (causal, W keys) or 'other', from a probed mask."""
    visible = visible.cpu()
    n = visible.shape[-1]
    if bool(visible.all()):
        return "bidirectional"
    offset = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # query - key
    window = int(visible[-1].sum())  # the last query sees the most keys under a causal band
    if torch.equal(visible, (offset >= 0) & (offset < window)):
        return "causal" if window == n else f"sliding window {window}"
    return "other"


class PostNorm:
    """A post-attention norm y = g * C(x) * s(x) + beta, linear in x for a fixed per-position scale s.

    g, beta and whether it centres (LayerNorm) or not (RMSNorm) are probed from the module itself; s is
    recovered per run from the module's own output as the least-squares fit of y - beta on g * C(x), so
    no epsilon or formula is assumed."""

    def __init__(self, module: nn.Module, d_model: int, dtype: torch.dtype):
        self.module = module
        c = 1e3  # large inputs: the norm's epsilon changes s by < 1e-12 relative
        u = torch.tensor([(-1.0) ** i for i in range(d_model)], dtype=dtype)
        if d_model % 2:
            u[-1] = 0.0
        rolled = torch.roll(u, 1)
        with torch.no_grad():
            self.beta = (module(c * u) + module(-c * u)) / 2
            gain = torch.zeros(d_model, dtype=dtype)
            for probe in (rolled, u):  # every entry is non-zero in at least one of the two
                rms = float(probe.pow(2).mean().sqrt())
                half = (module(c * probe) - module(-c * probe)) / 2  # = g * probe / rms
                nonzero = probe != 0
                gain[nonzero] = (half * rms / probe)[nonzero]
            self.gain = gain
            shifted = module(c * (u + 1.0)) - module(c * u)
            self.centres = bool(shifted.abs().max() <= 1e-4 * (1.0 + float(self.beta.abs().max())))

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True) if self.centres else x

    def scale(self, x: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch 1"]:
        """The per-position s with which the module normalises x (from the module's own output)."""
        y = self.module(x) - self.beta
        direction = self.gain * self._centre(x)
        norm2 = direction.pow(2).sum(dim=-1, keepdim=True)
        return (y * direction).sum(dim=-1, keepdim=True) / norm2.clamp_min(torch.finfo(x.dtype).tiny)

    def shares(self, parts: Float[torch.Tensor, "head *batch d_model"], s: torch.Tensor) -> torch.Tensor:
        return self.gain * self._centre(parts) * s


class HeadwiseAttention:
    """Layer `layer`'s attention block with per-head q/k/v residual inputs. Weights are read once."""

    def __init__(self, bridge: TransformerBridge, layer: int):
        cfg = bridge.cfg
        block = bridge.blocks[layer]
        attn = block.attn
        self.layer = layer
        self.W_Q = attn.W_Q.detach()  # [head, d_model, d_head]
        self.n_heads = int(self.W_Q.shape[0])
        n_kv = int(attn.W_K.shape[0])
        group = self.n_heads // n_kv
        self.norm = _inner(block.ln1) if hasattr(block, "ln1") else None
        self.W_K = attn.W_K.detach().repeat_interleave(group, dim=0) if group > 1 else attn.W_K.detach()
        self.W_V = attn.W_V.detach().repeat_interleave(group, dim=0) if group > 1 else attn.W_V.detach()
        self.W_O = attn.W_O.detach()  # [head, d_head, d_model]
        self.b_Q = _bias(attn, "b_Q", 1)
        self.b_K = _bias(attn, "b_K", group)
        self.b_V = _bias(attn, "b_V", group)
        self.b_O = _bias(attn, "b_O", 1)
        inner = _inner(attn)
        self.inner = inner
        self.uses_hf_rotary = hook_name("rot_cos", layer) in bridge.hook_dict
        self.native_rotary = None if self.uses_hf_rotary else getattr(inner, "rotary", None)
        self.q_norm, self.k_norm = _qk_norm(attn, inner, "q"), _qk_norm(attn, inner, "k")
        self.soft_cap = _soft_cap(inner)
        d_head = int(self.W_Q.shape[-1])
        self.scale_candidates = _scale_candidates(inner, d_head, layer)
        self.scale = self.scale_candidates[0][1]  # confirmed (or replaced) by `probe`
        self.mask = "causal"  # the mask kind `probe` saw; only the default when a run gives no mask
        post = getattr(block, "ln1_post", None)
        self.post_norm = PostNorm(_inner(post), int(cfg.d_model), self.W_O.dtype) if post is not None else None
        self._check_supported(bridge, attn, inner)

    def _check_supported(self, bridge: TransformerBridge, attn: nn.Module, inner: nn.Module) -> None:
        problems = []
        if getattr(inner, "sinks", None) is not None:
            problems.append("attention sinks")
        if getattr(attn, "_qk_norm_phase", None) == "pre_reshape":
            problems.append("a Q/K norm over all heads at once (pre-reshape)")
        if self.q_norm is not None and getattr(attn.config, "qk_norm_after_rope", False):
            problems.append("a Q/K norm after rotary")
        if self.uses_hf_rotary and (getattr(attn.config, "rotary_interleaved_cos_sin", False)
                                    or getattr(attn.config, "rotary_adjacent_pairs", False)):
            problems.append("adjacent-pair (interleaved) rotary")
        if getattr(attn.config, "gated_q_proj", False) or "gate" in getattr(attn, "_modules", {}):
            problems.append("gated attention output")
        if self.post_norm is not None and self.b_O is not None and bool(self.b_O.any()):
            problems.append("a post-attention norm together with an output bias b_O (the bias's share of the "
                            "norm depends on every head, so heads are not separable)")
        if self.W_Q.shape[0] % self.W_K.shape[0]:
            problems.append("a query-head count that is not a multiple of the key/value-head count")
        if problems:
            raise GraphError(f"layer {self.layer}: the masked-edge engine does not support {'; '.join(problems)}")

    # --- the recomputed attention -----------------------------------------------------------------------
    def scores(
        self,
        streams: Float[torch.Tensor, "qkv_head batch pos d_model"],
        cos: Rotary | None = None,
        sin: Rotary | None = None,
    ) -> tuple[Heads, Heads]:
        """(q, k) per query head after projection, Q/K norm and rotary (before the scale)."""
        H = self.n_heads
        normed = self.norm(streams[:2 * H]) if self.norm is not None else streams[:2 * H]
        q = torch.einsum("hbpd,hde->bhpe", normed[:H], self.W_Q)
        k = torch.einsum("hbpd,hde->bhpe", normed[H:], self.W_K)
        if self.b_Q is not None:
            q = q + self.b_Q[None, :, None, :]
        if self.b_K is not None:
            k = k + self.b_K[None, :, None, :]
        if self.q_norm is not None:
            q = _apply_head_norm(self.q_norm, q)
        if self.k_norm is not None:
            k = _apply_head_norm(self.k_norm, k)
        return self._rotary(q, k, cos, sin)

    def pattern(self, q: Heads, k: Heads, visible: Visible, scale: float | None = None) -> Pattern:
        """softmax over visible keys of soft_cap(scale * q.k), in at least float32."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * (self.scale if scale is None else scale)
        if self.soft_cap is not None:
            scores = torch.tanh(scores / self.soft_cap) * self.soft_cap
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
        # softmax in at least float32 (half-precision scores saturate), never below the input precision
        return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)

    def z(
        self,
        streams: Float[torch.Tensor, "qkv_head batch pos d_model"],
        cos: Rotary | None = None,
        sin: Rotary | None = None,
        visible: Visible | None = None,
    ) -> Float[torch.Tensor, "batch pos head d_head"]:
        """streams = [q inputs of heads 0..H-1, k inputs, v inputs] (residual, before ln1).

        visible: [query, key] keys each query may attend to, read from the forward's pattern in the same
        run (`visible_keys`). None: the mask kind the self-check probed on a short input (`default_mask`);
        a sliding window wider than that probe is seen only in a run's own pattern, so pass it."""
        H = self.n_heads
        q, k = self.scores(streams, cos, sin)
        normed_v = self.norm(streams[2 * H:]) if self.norm is not None else streams[2 * H:]
        v = torch.einsum("hbpd,hde->bhpe", normed_v, self.W_V)
        if self.b_V is not None:
            v = v + self.b_V[None, :, None, :]
        if visible is None:
            visible = self.default_mask(q.shape[2])
        pattern = self.pattern(q, k, visible).to(v.dtype)
        return torch.matmul(pattern, v).transpose(1, 2)  # [batch, pos, head, d_head]

    def default_mask(self, n_pos: int) -> Visible:
        """The probed mask kind (`self.mask`) at n_pos positions."""
        offset = torch.arange(n_pos)[:, None] - torch.arange(n_pos)[None, :]  # query - key
        if self.mask == "bidirectional":
            return torch.ones(n_pos, n_pos, dtype=torch.bool)
        window = int(self.mask.rsplit(" ", 1)[-1]) if self.mask.startswith("sliding window") else n_pos
        return (offset >= 0) & (offset < window)

    def _rotary(self, q: Heads, k: Heads, cos: Rotary | None, sin: Rotary | None) -> tuple[Heads, Heads]:
        if self.uses_hf_rotary:
            if cos is None or sin is None:
                raise GraphError(f"layer {self.layer}: rotary cos/sin were not captured from the bridge")
            dim = cos.shape[-1]
            cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
            if dim * 2 == q.shape[-1] and dim < q.shape[-1]:  # un-duplicated half-width tables (GPT-OSS)
                cos, sin, dim = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), 2 * dim
            if dim > q.shape[-1]:
                raise GraphError(f"layer {self.layer}: rotary tables of width {dim} > d_head {q.shape[-1]}")

            def rope(x: Heads) -> Heads:
                x_rot, x_pass = x[..., :dim], x[..., dim:]
                return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)
            return rope(q), rope(k)
        if self.native_rotary is not None:
            return self.native_rotary.apply_rope(q, k)
        return q, k

    def head_outputs(self, z: Float[torch.Tensor, "batch pos head d_head"]) -> Float[torch.Tensor, "head batch pos d_model"]:
        """Each head's output: z_h @ W_O[h] (without b_O, which belongs to no node), or with a
        post-attention norm its share of the normalised output (module docstring)."""
        parts = torch.einsum("bphe,hed->hbpd", z, self.W_O)
        if self.post_norm is None:
            return parts
        total = parts.sum(dim=0) if self.b_O is None else parts.sum(dim=0) + self.b_O
        return self.post_norm.shares(parts, self.post_norm.scale(total))

    # --- the probe ------------------------------------------------------------------------------------
    def probe(self, resid: Float[torch.Tensor, "batch pos d_model"], pattern: Pattern,
              cos: Rotary | None, sin: Rotary | None) -> str:
        """Pick the scale with which the recomputed pattern reproduces the forward's `pattern` on `resid`
        (this layer's input in a plain run); GraphError saying what differs when none does.

        Returns the mask kind seen ('causal', 'bidirectional', 'sliding window W')."""
        visible = visible_keys(pattern)
        streams = resid.unsqueeze(0).expand(3 * self.n_heads, *resid.shape)
        with torch.no_grad():
            q, k = self.scores(streams, cos, sin)
            want = pattern.detach().to(torch.promote_types(pattern.dtype, torch.float32))
            # Pattern entries lie in [0, 1]; a recomputation in another order differs by a few eps. 2^10
            # eps of the model's dtype is far below the change any other scale candidate makes.
            tolerance = 1024 * torch.finfo(pattern.dtype).eps
            errors = []
            for source, scale in self.scale_candidates:
                error = float((self.pattern(q, k, visible, scale) - want).abs().max())
                if error <= tolerance:
                    self.scale = scale
                    kind = mask_kind(visible)
                    if kind == "other":
                        raise GraphError(f"layer {self.layer}: the forward's attention mask is neither causal, "
                                         "bidirectional nor a causal sliding window")
                    self.mask = kind
                    return kind
                errors.append(f"{source} {scale:.6g} (max pattern difference {error:.3g})")
        fitted = self._fit_scale(q, k, want, visible)
        raise GraphError(
            f"layer {self.layer}: the recomputed attention pattern does not match the forward's for any scale "
            f"the module names ({'; '.join(errors)}); the forward's pattern fits a scale of {fitted}. The "
            "attention is not softmax(scale * q.k) of its rotated q and k (e.g. ALiBi, a relative position "
            "bias, or an unsupported rotary or norm variant)"
        )

    def _fit_scale(self, q: Heads, k: Heads, pattern: Pattern, visible: Visible) -> str:
        """Least-squares scale a in log p_ij = a * q_i.k_j - log Z_i over clearly visible keys (message only)."""
        if self.soft_cap is not None:
            return "unknown (soft-capped scores)"
        raw = torch.matmul(q, k.transpose(-2, -1)).double()
        logp = pattern.double().clamp_min(1e-30).log()
        use = visible.to(raw.device) & (pattern > 1e-20)
        count = use.sum(-1, keepdim=True).clamp_min(1)
        centre = lambda x: torch.where(use, x - (x * use).sum(-1, keepdim=True) / count, 0.0)  # noqa: E731
        x, y = centre(raw), centre(logp)
        denominator = float((x * x).sum())
        return f"{float((x * y).sum()) / denominator:.6g}" if denominator > 0 else "unknown"


def _bias(attn: nn.Module, name: str, group: int) -> Float[torch.Tensor, "head d_head"] | None:
    try:
        value = getattr(attn, name)
    except AttributeError:
        return None
    if value is None:
        return None
    value = value.detach()
    return value.repeat_interleave(group, dim=0) if group > 1 and value.ndim == 2 else value


def _qk_norm(attn: nn.Module, inner: nn.Module, which: str) -> nn.Module | None:
    """The Q or K norm the forward applies per head (the bridge's declared one, else the module's)."""
    for name in (f"{which}_norm", f"{which}_layernorm"):
        module = attn._modules.get(name) if hasattr(attn, "_modules") else None
        if module is None:
            module = getattr(inner, name, None)
        if isinstance(module, nn.Module):
            return _inner(module)
    return None


def _apply_head_norm(norm: nn.Module, x: Heads) -> Heads:
    """A per-head norm on [batch, head, pos, d_head]: weights [d_head] broadcast, [head, d_head] need the
    [batch, pos, head, d_head] layout (as the bridge does)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return norm(x.transpose(1, 2)).transpose(1, 2)
    return norm(x)


def _soft_cap(inner: nn.Module) -> float | None:
    """The score soft-cap the forward applies: HF `attn_logit_softcapping`, native `attn_scores_soft_cap`."""
    for name in ("attn_logit_softcapping", "attn_scores_soft_cap"):
        value: Any = getattr(inner, name, None)
        if value is not None and float(value) > 0:
            return float(value)
    return None


def _scale_candidates(inner: nn.Module, d_head: int, layer: int) -> list[tuple[str, float]]:
    """Scales the forward may use, most specific first: HF modules store the multiplier (`scaling`),
    native ones the divisor (`scale`); GPT-2-style modules may divide by (layer + 1) too."""
    out: list[tuple[str, float]] = []
    scaling, divisor = getattr(inner, "scaling", None), getattr(inner, "scale", None)
    if isinstance(scaling, (int, float)) and scaling > 0:
        out.append(("module scaling", float(scaling)))
    if isinstance(divisor, (int, float)) and divisor > 0:
        out.append(("1 / module scale", 1.0 / float(divisor)))
    out.append(("1/sqrt(d_head)", 1.0 / math.sqrt(d_head)))
    out.append(("1/(sqrt(d_head) (layer+1))", 1.0 / (math.sqrt(d_head) * (layer + 1))))
    out.append(("unscaled", 1.0))
    return out
