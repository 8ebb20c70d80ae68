"""Attention of one layer with a separate residual input per (query head, q/k/v): the masked-edge fast path.

In a masked-edge run every head's q, k and v inputs are different mixtures of sender outputs, and under
GQA two heads of one kv group may read different k/v inputs (the graph is ungrouped, as in MIB). The
bridge cannot compute that (its split-qkv inputs come per kv head on HF models and are missing on native
ones), so this module computes the attention block from the bridge's own weights, norm module and rotary
tables: per stream norm -> per-head projection (kv weights repeated per query head, the same
`repeat_interleave` grouping as HF's `repeat_kv`) -> RoPE -> causal softmax -> z. With identical streams
it equals the bridge's hook_z up to float32 rounding (tested on the toy models and SmolLM2).

Supported: causal attention with plain RMSNorm/LayerNorm pre-norm, with or without biases and GQA, with
no, native, or HF rotate-half RoPE. Q/K norms, soft-capping, sliding windows, partial or interleaved
rotary raise GraphError.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import nn

from circuitlab.errors import GraphError
from circuitlab.models.hooks import hook_name

if TYPE_CHECKING:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

Heads = Float[torch.Tensor, "batch head pos d_head"]
Rotary = Float[torch.Tensor, "batch pos d_head"]


def _inner(module: nn.Module) -> nn.Module:
    """The wrapped torch module of a bridge component (bypasses the bridge's hook points)."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) else module


def _rotate_half(x: Heads) -> Heads:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HeadwiseAttention:
    """Layer `layer`'s attention block with per-head q/k/v residual inputs. Weights are read once."""

    def __init__(self, bridge: TransformerBridge, layer: int):
        cfg = bridge.cfg
        block = bridge.blocks[layer]
        attn = block.attn
        self.layer = layer
        self.n_heads = int(cfg.n_heads)
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        group = self.n_heads // n_kv
        self.norm = _inner(block.ln1) if hasattr(block, "ln1") else None
        self.W_Q = attn.W_Q.detach()  # [head, d_model, d_head]
        self.W_K = attn.W_K.detach().repeat_interleave(group, dim=0) if group > 1 else attn.W_K.detach()
        self.W_V = attn.W_V.detach().repeat_interleave(group, dim=0) if group > 1 else attn.W_V.detach()
        self.W_O = attn.W_O.detach()  # [head, d_head, d_model]
        self.b_Q = _bias(attn, "b_Q", 1)
        self.b_K = _bias(attn, "b_K", group)
        self.b_V = _bias(attn, "b_V", group)
        inner = _inner(attn)
        self.uses_hf_rotary = hook_name("rot_cos", layer) in bridge.hook_dict
        self.native_rotary = None if self.uses_hf_rotary else getattr(inner, "rotary", None)
        # HF modules store the multiplier (`scaling`), native ones the divisor (`scale`).
        scaling, divisor = getattr(inner, "scaling", None), getattr(inner, "scale", None)
        if scaling is not None:
            self.scale = float(scaling)
        elif divisor is not None:
            self.scale = 1.0 / float(divisor)
        else:
            self.scale = 1.0 / math.sqrt(self.W_Q.shape[-1])
        self._check_supported(cfg, inner)

    def _check_supported(self, cfg: TransformerBridgeConfig, inner: nn.Module) -> None:
        problems = []
        if getattr(cfg, "use_qk_norm", False) or hasattr(inner, "q_norm"):
            problems.append("Q/K norms")
        if float(getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0 or getattr(inner, "attn_logit_softcapping", None):
            problems.append("attention soft-capping")
        if getattr(inner, "sliding_window", None) or getattr(cfg, "use_local_attn", False):
            problems.append("sliding-window attention")
        if getattr(cfg, "rotary_interleaved_cos_sin", False) or (self.uses_hf_rotary and getattr(cfg, "rotary_adjacent_pairs", False)):
            problems.append("interleaved rotary")
        if getattr(cfg, "attention_dir", "causal") != "causal":
            problems.append("bidirectional attention")
        if getattr(inner, "sinks", None) is not None:
            problems.append("attention sinks")
        if problems:
            raise GraphError(
                f"layer {self.layer}: the masked-edge engine does not support {', '.join(problems)}; "
                "use a llama/GPT-2 style model (e.g. smollm2-135m)"
            )

    def z(
        self,
        streams: Float[torch.Tensor, "qkv_head batch pos d_model"],
        cos: Rotary | None = None,
        sin: Rotary | None = None,
    ) -> Float[torch.Tensor, "batch pos head d_head"]:
        """streams = [q inputs of heads 0..H-1, k inputs, v inputs] (residual, before ln1)."""
        H = self.n_heads
        normed = self.norm(streams) if self.norm is not None else streams
        q = torch.einsum("hbpd,hde->bhpe", normed[:H], self.W_Q)
        k = torch.einsum("hbpd,hde->bhpe", normed[H:2 * H], self.W_K)
        v = torch.einsum("hbpd,hde->bhpe", normed[2 * H:], self.W_V)
        if self.b_Q is not None:
            q = q + self.b_Q[None, :, None, :]
        if self.b_K is not None:
            k = k + self.b_K[None, :, None, :]
        if self.b_V is not None:
            v = v + self.b_V[None, :, None, :]
        q, k = self._rotary(q, k, cos, sin)
        n_pos = q.shape[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        future = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=scores.device), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        # softmax in at least float32 (half-precision scores saturate), never below the input precision
        pattern = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
        return torch.matmul(pattern, v).transpose(1, 2)  # [batch, pos, head, d_head]

    def _rotary(self, q: Heads, k: Heads, cos: Rotary | None, sin: Rotary | None) -> tuple[Heads, Heads]:
        if self.uses_hf_rotary:
            if cos is None or sin is None:
                raise GraphError(f"layer {self.layer}: rotary cos/sin were not captured from the bridge")
            if cos.shape[-1] != q.shape[-1]:
                raise GraphError(f"layer {self.layer}: partial rotary (dim {cos.shape[-1]} < d_head {q.shape[-1]}) is not supported")
            cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.native_rotary is not None:
            return self.native_rotary.apply_rope(q, k)
        return q, k

    def head_outputs(self, z: Float[torch.Tensor, "batch pos head d_head"]) -> Float[torch.Tensor, "head batch pos d_model"]:
        """Each head's output z_h @ W_O[h] (without b_O, which belongs to no node)."""
        return torch.einsum("bphe,hed->hbpd", z, self.W_O)


def _bias(attn: nn.Module, name: str, group: int) -> Float[torch.Tensor, "head d_head"] | None:
    try:
        value = getattr(attn, name)
    except AttributeError:
        return None
    if value is None:
        return None
    value = value.detach()
    return value.repeat_interleave(group, dim=0) if group > 1 else value
