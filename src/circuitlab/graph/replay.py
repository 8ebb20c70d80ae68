"""Replaying recorded blocks for k stacked variants of a batch (masked-run restarts, path-patching restarts).

A block's call inputs are recorded once on the clean run; a restart feeds them to the block again for k
copies of the batch stacked along the batch dimension (row i*batch + b = copy i of prompt b, as
``tokens.repeat(k, 1)`` lays them out). `replay_blocks` is the one loop both restarts run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
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


class HookPoints:
    """A bridge's hook points by name, resolved once, and forward hooks installed on them for the duration
    of a block, as `bridge.hooks` adds them but without its rebuilding of the alias table on every call (a
    millisecond per restarted run). Restarts use it; their self-checks compare a restarted run with the
    full forward under `bridge.hooks`, so a hook point that would not fire cannot go unnoticed."""

    def __init__(self, bridge: TransformerBridge) -> None:
        self.bridge = bridge
        self.points: dict[str, HookPoint] = {}

    @contextmanager
    def installed(self, hooks: FwdHooks) -> Iterator[None]:
        added: list[tuple[HookPoint, Any]] = []
        try:
            for name, fn in hooks:
                assert isinstance(name, str)
                point = self.points.get(name)
                if point is None:
                    point = self.points[name] = self.bridge.hook_dict[name]
                added.append((point, point.add_hook(fn, dir="fwd")))
            yield
        finally:
            for point, handle in added:
                handle.hook.remove()
                point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def replay_blocks(points: HookPoints, calls: dict[int, BlockCall], x: Resid, start: int, *, batch: int,
                  k: int, layer_hooks: Callable[[int, Resid], FwdHooks] | None = None) -> Resid:
    """Blocks start..L-1 of `points.bridge` on x (k stacked copies of the batch's residual entering block
    `start`), each called with its recorded inputs; returns the residual after the last block.
    layer_hooks(layer, x): hooks active during that block only (hooks for every block are installed by
    the caller around the call instead)."""
    blocks = points.bridge.blocks
    for layer in range(start, len(blocks)):
        args, kwargs = calls[layer]
        block_args, block_kwargs = replay_args(args[1:], batch, k), replay_kwargs(kwargs, batch, k)
        if layer_hooks is None:
            out = blocks[layer](x, *block_args, **block_kwargs)
        else:
            with points.installed(layer_hooks(layer, x)):
                out = blocks[layer](x, *block_args, **block_kwargs)
        x = out[0] if isinstance(out, tuple) else out
    return x
