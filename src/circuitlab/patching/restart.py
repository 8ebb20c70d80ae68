"""Restart a forward pass at block `l` from a cached residual, through the bridge's own modules.

`bridge.forward(start_at_layer=k)` still executes blocks 0..k-1 internally, so it saves no compute. Instead
`LayerRestart` calls `bridge.blocks[l], ..., bridge.blocks[L-1]`, `bridge.ln_final` and `bridge.unembed`
directly. Each block bridge fires its own hook points (blocks.{l}.hook_*), so patches placed with
`bridge.hooks(...)` work exactly as in a full forward.

A block needs more than the residual: the attention mask, rotary cos/sin (`position_embeddings`), position
ids, and on some architectures per-layer variants (sliding-window masks, local vs global rotary). Rather than
rebuilding these, `capture()` records the keyword arguments every block received during one ordinary bridge
forward, and `run()` replays them. That is valid because circuitlab batches hold prompts of one token length
with no padding, so the mask and positions are the same for every row: row 0's values are broadcast to any
batch size. Record at batch size 1 (callers do): `_fit` treats a leading dim equal to the recorded batch size
as the batch dim, which is only unambiguous at 1. tests/unit/patching/test_restart.py and
tests/integration/patching/test_patching.py check restart == full forward on toy models and on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import PatchingError
from circuitlab.models.model import Model

# Block kwargs that carry generation state; a restarted, one-shot forward must not use or extend a KV cache.
_DROP = {"past_key_values": None, "past_key_value": None, "use_cache": False}


class LayerRestart:
    """Forward from block `layer` on a given residual; call `capture()` around one full forward first."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.bridge = model.bridge
        self.calls: list[tuple[tuple, dict[str, Any]]] | None = None
        self.batch_size = 0
        self.n_pos = 0

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record each block's call arguments during the forward run inside this context."""
        calls: list[tuple[tuple, dict[str, Any]] | None] = [None] * len(self.bridge.blocks)
        handles = []

        def recorder(index: int):
            def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.batch_size, self.n_pos = int(hidden.shape[0]), int(hidden.shape[1])
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[index] = (tuple(args[1:]), {**rest, **{k: v for k, v in _DROP.items() if k in rest}})

            return hook

        for i, block in enumerate(self.bridge.blocks):
            handles.append(block.register_forward_pre_hook(recorder(i), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls):
            raise PatchingError("could not record the block inputs of a forward pass; this architecture does not "
                                "run its blocks through bridge.blocks, so pass restart=False")
        self.calls = calls  # type: ignore[assignment]

    def run(
        self, layer: int, resid: Float[torch.Tensor, "rows pos d_model"],
        answer_pos: Int[torch.Tensor, " rows"] | None = None,
    ) -> Float[torch.Tensor, "rows pos_out vocab"]:
        """Logits of blocks layer..L-1 + ln_final + unembed applied to `resid` (the input of block `layer`).

        With `answer_pos`, only those positions are unembedded (pos_out = 1): the metrics score one position,
        and the unembedding is a large share of a small model's compute.
        """
        if self.calls is None:
            raise PatchingError("LayerRestart.run needs block inputs; run a forward inside capture() first")
        if resid.shape[1] != self.n_pos:
            raise PatchingError(f"restart recorded prompts of {self.n_pos} tokens but got {resid.shape[1]}")
        rows = int(resid.shape[0])
        x = resid
        for index in range(layer, len(self.bridge.blocks)):
            args, kwargs = self.calls[index]
            out = self.bridge.blocks[index](
                x, *(_fit(a, self.batch_size, rows) for a in args),
                **{k: _fit(v, self.batch_size, rows) for k, v in kwargs.items()},
            )
            x = out[0] if isinstance(out, tuple) else out
        if answer_pos is not None:
            x = x[torch.arange(rows), answer_pos].unsqueeze(1)
        return unembed(self.bridge, x)


def unembed(bridge: Any, x: Float[torch.Tensor, "rows pos d_model"]) -> Float[torch.Tensor, "rows pos vocab"]:
    """The bridge's head on the last block's output: final norm, unembedding, logit soft cap (if any)."""
    logits = bridge.unembed(bridge.ln_final(x))
    cap = float(getattr(bridge.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _fit(value: Any, recorded_rows: int, rows: int) -> Any:
    """Broadcast a recorded per-row tensor (mask, position ids) from row 0 to `rows` rows."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == recorded_rows:
        return value[:1].expand(rows, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_fit(v, recorded_rows, rows) for v in value)
    return value
