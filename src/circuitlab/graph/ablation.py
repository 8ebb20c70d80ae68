"""Ablated sender outputs for masked-edge runs: what an edge carries when its coefficient is 0.

kinds:
  corrupt   every sender's output on the corrupt prompt of the same example (patching); [S, batch, pos, d]
  mean      position-wise mean over a reference dataset (same token length as the prompts); [S, 1, pos, d]
  zero      zeros; [S, 1, pos, d]
  resample  the outputs on a reference prompt drawn at random (seeded) for each example; [S, batch, pos, d]
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from circuitlab.errors import GraphError
from circuitlab.graph.masked import MaskedEdgeEngine

ABLATIONS = ("corrupt", "mean", "zero", "resample")


def ablated_outputs(
    engine: MaskedEdgeEngine,
    kind: str,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    corrupt: Int[torch.Tensor, "batch pos"] | None = None,
    reference: Int[torch.Tensor, "n pos"] | None = None,
    seed: int = 0,
    chunk: int = 16,
) -> Float[torch.Tensor, "sender batch_or_1 pos d_model"]:
    """The senders' ablated outputs for a masked run on `tokens` (see the module docstring)."""
    batch, n_pos = tokens.shape
    if kind == "corrupt":
        if corrupt is None or tuple(corrupt.shape) != (batch, n_pos):
            got = None if corrupt is None else tuple(corrupt.shape)
            raise GraphError(f"ablation 'corrupt' needs corrupt tokens of shape {(batch, n_pos)} (one per clean prompt), got {got}")
        return engine.sender_outputs(corrupt)
    if kind == "zero":
        return torch.zeros(engine.graph.n_senders, 1, n_pos, _d_model(engine))
    if kind in ("mean", "resample"):
        if reference is None or reference.ndim != 2 or reference.shape[1] != n_pos or reference.shape[0] < 1:
            got = None if reference is None else tuple(reference.shape)
            raise GraphError(
                f"ablation {kind!r} needs reference tokens [n, {n_pos}] (same token length as the prompts, "
                f"position-wise), got {got}"
            )
        outputs = torch.cat([engine.sender_outputs(reference[i:i + chunk]) for i in range(0, reference.shape[0], chunk)], 1)
        if kind == "mean":
            return outputs.mean(dim=1, keepdim=True)
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(reference.shape[0], (batch,), generator=generator)
        return outputs[:, rows]
    raise GraphError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")


def _d_model(engine: MaskedEdgeEngine) -> int:
    return engine.model.d_model
