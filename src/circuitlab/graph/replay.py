"""Replaying recorded blocks for k stacked variants of a batch (masked-run restarts, path-patching restarts).

A block's call inputs are recorded once on the clean run; a restart feeds them to the block again for k
copies of the batch stacked along the batch dimension (row i*batch + b = copy i of prompt b, as
``tokens.repeat(k, 1)`` lays them out). `replay_blocks` is the one loop both restarts run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

BlockCall = tuple[tuple[Any, ...], dict[str, Any]]  # a block's recorded (args, kwargs), residual first
# run_with_hooks' own parameter type (a list is invariant, so a list of (str, HookFn) would not match it).
FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
Resid = Float[torch.Tensor, "rows pos d_model"]


def expand_rows(value: Any, batch: int, k: int) -> Any:
    """A recorded block input for k stacked copies of the batch: batch-first tensors repeated k times;
    tuples element-wise; anything else (masks broadcast over the batch, flags) as it is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch and batch > 1:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    if isinstance(value, tuple):
        return tuple(expand_rows(v, batch, k) for v in value)
    return value


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


def replay_args(args: tuple[Any, ...], batch: int, k: int) -> tuple[Any, ...]:
    """A block's recorded positional inputs after the residual, for k copies. Some HF blocks take their
    attention mask and KV cache positionally (GPT-2: block(hidden, cache, mask, ...)): the mask is
    repeated like any batch-first input, the cache dropped as in `replay_kwargs`."""
    return tuple(None if _is_cache(value) else expand_rows(value, batch, k) for value in args)


def replay_kwargs(kwargs: dict[str, Any], batch: int, k: int) -> dict[str, Any]:
    """A block's recorded keyword inputs for k copies; KV caches dropped, because a replay must not append
    to the recorded run's cache."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if _is_cache(value) or key in ("past_key_value", "past_key_values"):
            out[key] = None
        elif key == "use_cache":
            out[key] = False
        else:
            out[key] = expand_rows(value, batch, k)
    return out


def replay_blocks(bridge: TransformerBridge, calls: dict[int, BlockCall], x: Resid, start: int, *, batch: int,
                  k: int, layer_hooks: Callable[[int, Resid], FwdHooks] | None = None) -> Resid:
    """Blocks start..L-1 on x (k stacked copies of the batch's residual entering block `start`), each
    called with its recorded inputs; returns the residual after the last block. layer_hooks(layer, x):
    hooks active during that block only (hooks for every block are installed by the caller around the
    call instead)."""
    for layer in range(start, len(bridge.blocks)):
        args, kwargs = calls[layer]
        block_args, block_kwargs = replay_args(args[1:], batch, k), replay_kwargs(kwargs, batch, k)
        if layer_hooks is None:
            out = bridge.blocks[layer](x, *block_args, **block_kwargs)
        else:
            with bridge.hooks(fwd_hooks=layer_hooks(layer, x)):
                out = bridge.blocks[layer](x, *block_args, **block_kwargs)
        x = out[0] if isinstance(out, tuple) else out
    return x
