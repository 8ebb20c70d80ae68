"""Replaying recorded blocks for k stacked variants of a batch (masked-run restarts, path-patching restarts).

A block's call inputs are recorded once on the clean run; a restart feeds them to the block again for k
copies of the batch stacked along the batch dimension (row i*batch + b = copy i of prompt b, as
``tokens.repeat(k, 1)`` lays them out).
"""

from __future__ import annotations

from typing import Any

import torch


def expand_rows(value: Any, batch: int, k: int) -> Any:
    """A recorded block input for k stacked copies of the batch: batch-first tensors repeated k times;
    tuples element-wise; anything else (masks broadcast over the batch, flags) as it is."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch and batch > 1:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    if isinstance(value, tuple):
        return tuple(expand_rows(v, batch, k) for v in value)
    return value


def replay_kwargs(kwargs: dict[str, Any], batch: int, k: int) -> dict[str, Any]:
    """A block's recorded keyword inputs for k copies; KV caches dropped, because a replay must not append
    to the recorded run's cache."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if type(value).__name__.endswith("Cache") or key in ("past_key_value", "past_key_values"):
            out[key] = None
        elif key == "use_cache":
            out[key] = False
        else:
            out[key] = expand_rows(value, batch, k)
    return out
