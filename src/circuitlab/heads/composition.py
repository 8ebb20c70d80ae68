"""Q-, K- and V-composition scores between attention heads (Elhage et al. 2021, "A Mathematical Framework
for Transformer Circuits").

A head h reads the residual stream x through its QK circuit W_QK = W_Q W_K^T (attention score
x_dest W_QK x_src^T) and writes x W_OV, W_OV = W_V W_O (TransformerLens' row-vector convention: d_model x
d_model matrices of rank d_head). A later head h2 can read what an earlier head h1 wrote with its query,
its key or its value; how much of h1's output space h2's circuit reads is

    Q-composition  ||W_OV^1 W_QK^2||   / (||W_OV^1|| ||W_QK^2||)
    K-composition  ||W_OV^1 W_QK^2^T|| / (||W_OV^1|| ||W_QK^2||)
    V-composition  ||W_OV^1 W_OV^2||   / (||W_OV^1|| ||W_OV^2||)

with Frobenius norms; the paper's ||W_QK^T W_OV|| in column-vector convention is the same number. The score
lies in [0, 1]; even unrelated random matrices score above 0, so `random_baseline` gives the mean score of
Gaussian random matrices of the same shapes (the paper subtracts it).

Grouped-query attention: a key/value head's W_K and W_V are shared by its query group (query head h reads
kv head h // (n_heads / n_kv_heads)), so each query head's W_QK uses its own W_Q with its group's W_K, and
its W_OV its group's W_V with its own W_O, as TransformerLens' ``TransformerBridge.all_composition_scores``.

Weights are those the bridge exposes as loaded: the pre-attention norm's scale is not folded in (circuitlab
loads without weight processing), as TransformerLens' ``TransformerBridge.all_composition_scores`` on such a
model. Scores of pairs not in strictly increasing layers are NaN.

The d_model x d_model products are never built: with V = U_V R_V (thin QR; `_r`), ||V O X|| = ||R_V O X||, so each
writer is a d_head x d_model factor A = R_V W_O and each reader a d_model x d_head factor B (e.g. Q-
composition: W_QK = W_Q R_K^T U_K^T, B = W_Q R_K^T); the score is ||A B|| / (||A|| ||B||).
See docs/METHODS.md, "Head analysis".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from circuitlab.errors import HeadsError
from circuitlab.graph.naming import head_name
from circuitlab.models.model import Model
from circuitlab.progress import progress_bar

MODES = ("q", "k", "v")
BASELINE_SAMPLES = 64  # random writer/reader pairs per mode: the mean is good to about 1% of the score


@dataclass(frozen=True)
class HeadWeights:
    """Per-head weights [layer, head, ...], key/value weights expanded to every query head."""

    W_Q: Float[torch.Tensor, "layer head d_model d_head"]  # noqa: N815 - TransformerLens' names
    W_K: Float[torch.Tensor, "layer head d_model d_head"]  # noqa: N815
    W_V: Float[torch.Tensor, "layer head d_model d_head"]  # noqa: N815
    W_O: Float[torch.Tensor, "layer head d_head d_model"]  # noqa: N815


def head_weights(model: Model) -> HeadWeights:
    """The bridge's stacked attention weights, K and V repeated over each query group (grouped-query)."""
    bridge = model.bridge
    with torch.no_grad():
        w_q, w_k, w_v, w_o = (w.detach().float() for w in (bridge.W_Q, bridge.W_K, bridge.W_V, bridge.W_O))
    n_heads, n_kv = w_q.shape[1], w_k.shape[1]
    if n_heads % n_kv:
        raise HeadsError(f"{n_heads} query heads do not split into groups over {n_kv} key/value heads")
    group = n_heads // n_kv
    return HeadWeights(w_q, w_k.repeat_interleave(group, 1), w_v.repeat_interleave(group, 1), w_o)


def _r(factor: Float[torch.Tensor, "... d_model d_head"]) -> Float[torch.Tensor, "... d_head d_head"]:
    """R with R^T R = F^T F, so ||F X|| = ||R X|| for every X: R = sqrt(L) E^T from the eigendecomposition of
    the d_head x d_head Gram matrix (a thin QR would do, but is slow batched; this also handles rank-
    deficient heads, e.g. the all-zero heads of the hand-set model). In float64: the Gram matrix squares the
    factor's conditioning."""
    gram = factor.double().transpose(-2, -1) @ factor.double()
    values, vectors = torch.linalg.eigh(gram)
    return (values.clamp(min=0).sqrt()[..., :, None] * vectors.transpose(-2, -1)).to(factor.dtype)


def writer_factors(w: HeadWeights) -> Float[torch.Tensor, "layer head k d_model"]:
    """A = R_V W_O: ||A X|| = ||W_OV X|| for every X."""
    return _r(w.W_V) @ w.W_O


def reader_factors(w: HeadWeights, mode: str) -> Float[torch.Tensor, "layer head d_model k"]:
    """B with ||X B|| = ||X M|| for the reader's matrix M: W_QK (q), W_QK^T (k) or W_OV (v)."""
    if mode == "q":
        return w.W_Q @ _r(w.W_K).transpose(-2, -1)
    if mode == "k":
        return w.W_K @ _r(w.W_Q).transpose(-2, -1)
    if mode == "v":
        return w.W_V @ _r(w.W_O.transpose(-2, -1)).transpose(-2, -1)
    raise HeadsError(f"unknown composition {mode!r}; choose one of {', '.join(MODES)}")


def pair_scores(writers: Float[torch.Tensor, "w k d_model"], readers: Float[torch.Tensor, "r d_model k2"]) -> Float[torch.Tensor, "w r"]:
    """||A B|| / (||A|| ||B||) for every writer factor A and reader factor B."""
    products = torch.einsum("wkd,rdj->wrkj", writers, readers)
    norms = writers.flatten(1).norm(dim=-1)[:, None] * readers.flatten(1).norm(dim=-1)[None, :]
    # A head that writes (or reads) nothing composes with nothing: 0, not 0 / 0.
    return torch.where(norms > 0, products.flatten(2).norm(dim=-1) / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)


@dataclass(frozen=True)
class CompositionScores:
    """Scores [writer layer, writer head, reader layer, reader head] by mode (NaN unless writer layer <
    reader layer), and the random baseline of each mode."""

    scores: dict[str, Float[torch.Tensor, "layer head layer head"]]
    baseline: dict[str, float]

    @property
    def n_layers(self) -> int:
        return self.scores["k"].shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores["k"].shape[1]

    def partner(self, mode: str, layer: int, head: int) -> tuple[str, float] | None:
        """The earlier head composing most with head (layer, head) by `mode`, and its score."""
        if layer == 0:
            return None
        column = self.scores[mode][:layer, :, layer, head]
        best = int(column.flatten().argmax())
        return head_name(*divmod(best, self.n_heads)), float(column.flatten()[best])

    def pairs(self) -> list[dict]:
        """One row per (writer, reader) pair in different layers: every mode's score."""
        rows = []
        n_layers, n_heads = self.n_layers, self.n_heads
        for l2 in range(1, n_layers):
            for h2 in range(n_heads):
                for l1 in range(l2):
                    for h1 in range(n_heads):
                        rows.append({"writer": head_name(l1, h1), "reader": head_name(l2, h2),
                                     **{m: float(self.scores[m][l1, h1, l2, h2]) for m in MODES}})
        return rows

    def strongest(self, mode: str, k: int) -> list[tuple[str, str, float]]:
        """The k (writer, reader, score) pairs of largest score."""
        flat = self.scores[mode].flatten().nan_to_num(-1.0)
        top = flat.topk(min(k, int((flat >= 0).sum()))).indices
        n = self.n_heads
        out = []
        for index in top.tolist():
            l1, h1, l2, h2 = index // (n * self.n_layers * n), index // (self.n_layers * n) % n, index // n % self.n_layers, index % n
            out.append((head_name(l1, h1), head_name(l2, h2), float(flat[index])))
        return out


def composition_scores(model: Model, *, baseline_samples: int = BASELINE_SAMPLES, seed: int = 0) -> CompositionScores:
    """Q-, K- and V-composition of every (earlier writer, later reader) head pair, with random baselines."""
    weights = head_weights(model)
    d_model, d_head = weights.W_Q.shape[2:]
    shape = (d_model, d_head)
    baseline = {mode: random_baseline(shape, mode, baseline_samples, seed=seed) for mode in MODES}
    return CompositionScores(weight_scores(weights), baseline)


def weight_scores(weights: HeadWeights) -> dict[str, Float[torch.Tensor, "layer head layer head"]]:
    """Every mode's scores [writer layer, writer head, reader layer, reader head] (NaN unless writer layer <
    reader layer): one writer layer against every later reader at a time."""
    n_layers, n_heads = weights.W_Q.shape[:2]
    writers = writer_factors(weights)
    scores = {}
    with torch.no_grad(), progress_bar(len(MODES) * (n_layers - 1), "composition scores") as advance:
        for mode in MODES:
            readers = reader_factors(weights, mode)
            grid = torch.full((n_layers, n_heads, n_layers, n_heads), float("nan"))
            for l1 in range(n_layers - 1):
                later = readers[l1 + 1:].flatten(0, 1)
                grid[l1, :, l1 + 1:] = pair_scores(writers[l1], later).unflatten(1, (n_layers - l1 - 1, n_heads))
                advance(1)
            scores[mode] = grid
    return scores


def random_baseline(shape: tuple[int, int], mode: str, n_samples: int = BASELINE_SAMPLES, *, seed: int = 0) -> float:
    """The mean `mode` composition score of `n_samples` pairs of heads with iid Gaussian W_Q, W_K, W_V
    (d_model x d_head, `shape`) and W_O (d_head x d_model): the score of unrelated heads of this size."""
    if n_samples < 1:
        raise HeadsError(f"the random baseline needs at least one sample, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    d_model, d_head = shape

    def heads(n: int) -> HeadWeights:
        def draw(*size: int) -> torch.Tensor:
            return torch.randn(n, 1, *size, generator=generator)
        return HeadWeights(draw(d_model, d_head), draw(d_model, d_head), draw(d_model, d_head), draw(d_head, d_model))

    writer, reader = heads(n_samples), heads(n_samples)
    a = writer_factors(writer)[:, 0]
    b = reader_factors(reader, mode)[:, 0]
    return float(torch.stack([pair_scores(a[i:i + 1], b[i:i + 1])[0, 0] for i in range(n_samples)]).mean())
