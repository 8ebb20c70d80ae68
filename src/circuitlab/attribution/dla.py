"""Direct logit attribution (DLA): the final residual stream split into the outputs of every component,
each pushed through the final norm with its scale frozen at the value of the actual run, and projected on
the answer direction (docs/METHODS.md, "Direct logit attribution").

resid_final = embed (+ pos_embed) + sum_l [sum_h z_h W_O[h] + b_O] + sum_l mlp_out, so with the frozen
scale sigma the logit difference is exactly sum_c (norm_centre(c) / sigma) . (w_norm * dir) plus the
norm-bias and unembedding-bias terms, where dir = mean W_U[:, answers] - mean W_U[:, wrong].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from circuitlab.errors import AttributionError, MetricError
from circuitlab.models.hooks import hook_name
from circuitlab.models.model import Model
from circuitlab.tasks.task import TaskBatch

# Relative tolerance of the runtime check that the components rebuild the final residual stream.
RECONSTRUCTION_RTOL = 1e-3


@dataclass
class ComponentAttribution:
    """DLA values of every component at each prompt's answer position. Component labels: 'embed',
    'pos_embed', 'L{l}H{h}', 'L{l}.attn_bias', 'L{l}.mlp', 'ln_final.bias', 'unembed.bias'.

    values: [prompt, component] contribution at the answer position (sums to the logit difference).
    target: [prompt] the model's own logit difference (or answer logit) at the answer position.

    Nothing here depends on positions, so prompts of different token lengths combine (`concat`).
    """

    labels: list[str]
    values: Float[torch.Tensor, "batch component"]
    target: Float[torch.Tensor, " batch"]
    n_layers: int
    n_heads: int

    @staticmethod
    def concat(parts: list[ComponentAttribution]) -> ComponentAttribution:
        """The prompts of every part, in order (e.g. one part per token length)."""
        first = parts[0]
        if any(p.labels != first.labels for p in parts):
            raise AttributionError("DLA parts of different models cannot be combined (their components differ)")
        return ComponentAttribution(first.labels, torch.cat([p.values for p in parts]),
                                    torch.cat([p.target for p in parts]), first.n_layers, first.n_heads)

    @property
    def total(self) -> Float[torch.Tensor, " batch"]:
        return self.values.sum(-1)

    @property
    def relative_error(self) -> float:
        """max over prompts |sum of components - logit difference| / |logit difference|."""
        return float(((self.total - self.target).abs() / self.target.abs().clamp(min=1e-12)).max())

    def head_values(self) -> Float[torch.Tensor, "batch layer head"]:
        idx = [self.labels.index(f"L{layer}H{h}") for layer in range(self.n_layers) for h in range(self.n_heads)]
        return self.values[:, idx].reshape(-1, self.n_layers, self.n_heads)

    def layer_values(self) -> dict[str, Float[torch.Tensor, "batch layer"]]:
        """Per-layer totals of attention (heads + bias) and MLP contributions."""
        heads = self.head_values().sum(-1)
        bias = torch.stack([self._column(f"L{layer}.attn_bias") for layer in range(self.n_layers)], -1)
        mlp = torch.stack([self._column(f"L{layer}.mlp") for layer in range(self.n_layers)], -1)
        return {"attn": heads + bias, "mlp": mlp}

    def _column(self, label: str) -> torch.Tensor:
        if label not in self.labels:
            return torch.zeros(self.values.shape[0])
        return self.values[:, self.labels.index(label)]

    def records(self) -> list[dict]:
        """Tidy rows: one per component, mean over prompts (and the per-prompt std)."""
        mean, std = self.values.mean(0), self.values.std(0) if self.values.shape[0] > 1 else torch.zeros_like(self.values[0])
        rows = []
        for i, label in enumerate(self.labels):
            layer, head, kind = _parse_label(label)
            rows.append({"component": label, "kind": kind, "layer": layer, "head": head,
                         "value": float(mean[i]), "std": float(std[i])})
        return rows


@dataclass
class DirectLogitAttribution(ComponentAttribution):
    """DLA of one batch (prompts of one token length): the component values plus two position tables.

    by_position: [batch, component, pos] the same projection at every position (each with its own frozen
      final-norm scale; the direction is the answer direction of the prompt).
    head_by_source: [batch, layer, head, src] each head's value at the answer position split over the key
      positions it attends to (pattern[q, k] * v_k W_O[h]); sums over src to the head's value.
    """

    by_position: Float[torch.Tensor, "batch component pos"] = field(kw_only=True)
    head_by_source: Float[torch.Tensor, "batch layer head src"] = field(kw_only=True)

    def layer_by_position(self) -> Float[torch.Tensor, "layer pos"]:
        """Each layer's total (heads, attention bias, MLP) projected at every position, mean over prompts."""
        layers = [_parse_label(label)[0] for label in self.labels]
        mean = self.by_position.mean(0)  # [component, pos]
        return torch.stack([mean[[i for i, lay in enumerate(layers) if lay == layer]].sum(0)
                            for layer in range(self.n_layers)])


def _parse_label(label: str) -> tuple[int, int, str]:
    if not label.startswith("L"):
        return -1, -1, label
    layer_part, rest = label[1:].split(".", 1) if "." in label else (label[1:], "")
    if "H" in layer_part:
        layer, head = layer_part.split("H")
        return int(layer), int(head), "head"
    return int(layer_part), -1, rest


def answer_direction(
    model: Model, answers: Int[torch.Tensor, "batch n"], wrong: Int[torch.Tensor, "batch m"]
) -> tuple[Float[torch.Tensor, "batch d_model"], Float[torch.Tensor, " batch"]]:
    """Mean unembedding of the answer set minus that of the wrong set (the answer's own logit when a prompt
    has no wrong answers), and the matching unembedding-bias difference. Ids are padded with -1."""
    W_U, b_U = model.bridge.W_U.detach(), model.bridge.b_U.detach()
    direction, bias = _mean_columns(W_U, b_U, answers)
    wrong_direction, wrong_bias = _mean_columns(W_U, b_U, wrong)  # zero for a prompt without wrong answers
    return direction - wrong_direction, bias - wrong_bias


def _mean_columns(W_U: torch.Tensor, b_U: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (ids >= 0).float()
    count = mask.sum(1).clamp(min=1)
    cols = W_U.T[ids.clamp(min=0)]  # [batch, n, d_model]
    return (cols * mask[..., None]).sum(1) / count[:, None], (b_U[ids.clamp(min=0)] * mask).sum(1) / count


def head_output_weights(model: Model, layer: int) -> tuple[Float[torch.Tensor, "head d_head d_model"], torch.Tensor | None]:
    """W_O per head and the output bias, read from the layer's o projection (HF o_proj / native o).

    The o projection maps the concatenated heads [.., head * d_head] to d_model, so its weight
    [d_model, head * d_head] transposed and split gives W_O[h] = weight[:, h*d_head:(h+1)*d_head].T.
    """
    o = model.bridge.blocks[layer].attn.o
    linear = getattr(o, "original_component", o)
    weight = linear.weight.detach()
    d_head = weight.shape[1] // model.n_heads
    W_O = weight.T.reshape(model.n_heads, d_head, weight.shape[0])
    bias = getattr(linear, "bias", None)
    return W_O, None if bias is None else bias.detach()


def final_norm(model: Model) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(kind, effective weight, bias) of the final norm: kind is 'RMS', 'LN' or 'none'."""
    kind = model.cfg.normalization_type
    if kind is None:
        return "none", None, None
    if kind not in ("RMS", "RMSPre", "LN", "LNPre"):
        raise AttributionError(f"direct logit attribution does not support final norm type {kind!r}; use a model "
                               "with RMSNorm, LayerNorm or no final norm")
    module = model.bridge.ln_final
    module = getattr(module, "original_component", module)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if kind.endswith("Pre"):
        weight = bias = None  # folded norms have no parameters
    elif weight is not None:
        weight = weight.detach()
        if getattr(model.cfg, "rmsnorm_uses_offset", False):
            weight = weight + 1.0  # Gemma-style RMSNorm multiplies by (1 + w)
    return ("RMS" if kind.startswith("RMS") else "LN"), weight, None if bias is None else bias.detach()


def _hook_names(model: Model) -> list[str]:
    names = [hook_name("embed"), _final_resid(model)]
    if model.cfg.positional_embedding_type == "standard":
        names.append(hook_name("pos_embed"))
    if final_norm(model)[0] != "none":
        names.append(hook_name("final_norm_scale"))
    for layer in range(model.n_layers):
        names += [hook_name(site, layer) for site in ("z", "pattern", "v")]
        if not model.attn_only:
            names.append(hook_name("mlp_out", layer))
    return names


def _final_resid(model: Model) -> str:
    return hook_name("resid_post", model.n_layers - 1)


@torch.no_grad()
def direct_logit_attribution(model: Model, batch: TaskBatch) -> DirectLogitAttribution:
    """DLA of every component for the prompts of `batch` (clean prompts, answer vs wrong direction)."""
    tokens = batch.clean
    model.check_tokens(tokens)
    if (batch.answers < 0).all(1).any():
        raise MetricError("direct logit attribution needs an answer token for every prompt")
    names = set(_hook_names(model))
    logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    n_batch, n_pos = tokens.shape
    rows = torch.arange(n_batch)
    direction, unembed_bias = answer_direction(model, batch.answers, batch.wrong)
    kind, weight, norm_bias = final_norm(model)
    # Frozen final norm: every component is divided by the run's own scale at its position.
    scale = cache[hook_name("final_norm_scale")][..., 0] if kind != "none" else torch.ones(n_batch, n_pos)
    read = direction if weight is None else direction * weight  # [batch, d_model]
    if kind == "LN":
        read = read - read.mean(-1, keepdim=True)  # LayerNorm's centring: (c - mean c) . r = c . (r - mean r)

    labels: list[str] = []
    parts: list[torch.Tensor] = []  # each [batch, pos]
    residual = torch.zeros_like(cache[_final_resid(model)])

    def add(label: str, vector: Float[torch.Tensor, "batch pos d_model"]) -> None:
        nonlocal residual
        residual = residual + vector
        labels.append(label)
        parts.append(torch.einsum("bpd,bd->bp", vector, read) / scale)

    add("embed", cache[hook_name("embed")])
    if hook_name("pos_embed") in cache:
        add("pos_embed", cache[hook_name("pos_embed")].expand_as(residual))
    head_by_source = torch.zeros(n_batch, model.n_layers, model.n_heads, n_pos)
    for layer in range(model.n_layers):
        W_O, b_O = head_output_weights(model, layer)
        z = cache[hook_name("z", layer)]  # [batch, pos, head, d_head]
        head_vectors = torch.einsum("bphd,hdm->bphm", z, W_O)
        for h in range(model.n_heads):
            add(f"L{layer}H{h}", head_vectors[:, :, h])
        if b_O is not None:
            add(f"L{layer}.attn_bias", b_O.expand_as(residual))
        head_by_source[:, layer] = _split_by_source(model, cache, layer, W_O, read, scale, batch.answer_pos)
        if not model.attn_only:
            add(f"L{layer}.mlp", cache[hook_name("mlp_out", layer)])
    _check_reconstruction(model, residual, cache[_final_resid(model)])

    by_position = torch.stack(parts, 1)  # [batch, component, pos]
    values = by_position[rows, :, batch.answer_pos]
    if norm_bias is not None:
        labels.append("ln_final.bias")
        values = torch.cat([values, (direction @ norm_bias)[:, None]], 1)
        by_position = torch.cat([by_position, (direction @ norm_bias)[:, None, None].expand(-1, 1, n_pos)], 1)
    if bool(unembed_bias.abs().max() > 0):
        labels.append("unembed.bias")
        values = torch.cat([values, unembed_bias[:, None]], 1)
        by_position = torch.cat([by_position, unembed_bias[:, None, None].expand(-1, 1, n_pos)], 1)
    final = logits[rows, batch.answer_pos]
    target = (final * _dense(batch.answers, final.shape[-1])).sum(-1) - (final * _dense(batch.wrong, final.shape[-1])).sum(-1)
    return DirectLogitAttribution(labels, values, target, model.n_layers, model.n_heads, by_position=by_position,
                                  head_by_source=head_by_source)


def _dense(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[batch, vocab] weights averaging the valid ids of each row (all zero for a row without ids)."""
    mask = (ids >= 0).float()
    out = torch.zeros(ids.shape[0], vocab)
    out.scatter_add_(1, ids.clamp(min=0), mask)
    return out / mask.sum(1, keepdim=True).clamp(min=1)


def _split_by_source(
    model: Model, cache: dict, layer: int, W_O: torch.Tensor, read: torch.Tensor, scale: torch.Tensor,
    answer_pos: torch.Tensor,
) -> Float[torch.Tensor, "batch head src"]:
    """Each head's DLA at the answer position split over key positions: pattern[q,k] * (v_k W_O[h]) . read."""
    rows = torch.arange(read.shape[0])
    pattern = cache[hook_name("pattern", layer)][rows, :, answer_pos]  # [batch, head, src]
    v = cache[hook_name("v", layer)]  # [batch, src, kv_head, d_head]
    if v.shape[2] != model.n_heads:  # grouped-query attention: each kv head serves a group of query heads
        v = v.repeat_interleave(model.n_heads // v.shape[2], dim=2)
    value_read = torch.einsum("bkhd,hdm,bm->bhk", v, W_O, read)
    return pattern * value_read / scale[rows, answer_pos][:, None, None]


def _check_reconstruction(model: Model, rebuilt: torch.Tensor, actual: torch.Tensor) -> None:
    error = float((rebuilt - actual).norm() / actual.norm())
    if error > RECONSTRUCTION_RTOL:
        raise AttributionError(
            f"the final residual stream of {model.spec} is not the sum of embeddings, head outputs (z W_O) and "
            f"MLP outputs (relative error {error:.2e}); this architecture (e.g. post-attention norms) is not "
            "supported by direct logit attribution"
        )
