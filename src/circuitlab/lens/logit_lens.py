"""Logit lens (nostalgebraist 2020; docs/METHODS.md, "Logit lens"): read every residual stream as if it
were the last.

logits_l = unembed(ln_final(resid_l)) with the model's own final norm (RMSNorm with its weight for SmolLM2)
and unembedding, applied through the bridge modules `bridge.ln_final` and `bridge.unembed` (pure functions
of their input; tests check this). Multiplying by W_U without the final norm would mis-scale every layer
and not reproduce the model's logits at the last layer; this version does (tested against the logits).

Depth index `layer` l = 0..L means "after l blocks": l < L reads the ``resid_pre`` site of block l (l = 0
is the embedding), l = L reads the ``resid_post`` site of the last block.

Precision: the logits come from the model in its dtype; the softmax, the probabilities and
KL(final || layer) are computed in float64. In float32, torch's CPU `log_softmax` over a 49k vocabulary
sums to 1 + 1.2e-5, which put KL off by up to 1.4e-3 nats above ~5 nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import LensError
from circuitlab.lens.plots import plot_lens
from circuitlab.models.hooks import hook_name, layer_hook_names
from circuitlab.models.model import Model

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def lens_sites(model: Model) -> list[str]:
    """Hook names read by the lens, one per depth 0..L."""
    return layer_hook_names("resid_pre", model.n_layers) + [hook_name("resid_post", model.n_layers - 1)]


def lens_from_resid(model: Model, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
    """Final norm + unembedding of a residual stream (+ the model's final logit soft-cap, if it has one)."""
    bridge = model.bridge
    logits = bridge.unembed(bridge.ln_final(resid))
    cap = float(getattr(bridge.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def kl_divergence(
    p_log: Float[torch.Tensor, "... vocab"], q_log: Float[torch.Tensor, "... vocab"]
) -> Float[torch.Tensor, "..."]:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities (pass float64 for a 1e-9 accurate
    value: float32 log-softmax rounding alone is ~1e-5 over a large vocabulary)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@dataclass
class LensResult:
    """Lens read-outs at every depth (rows) and position (columns).

    top_ids/top_probs: [depth, pos, k]; kl: [depth, pos] KL(final || depth); target_rank (1 = top-1) and
    target_prob: [depth, pos] when a target was given.
    """

    str_tokens: list[str]
    sites: list[str]
    top_ids: Int[torch.Tensor, "depth pos k"]
    top_probs: Float[torch.Tensor, "depth pos k"]
    top_tokens: list[list[list[str]]]
    kl: Float[torch.Tensor, "depth pos"]
    target: str | None = None
    target_id: int | None = None
    target_rank: Int[torch.Tensor, "depth pos"] | None = None
    target_prob: Float[torch.Tensor, "depth pos"] | None = None

    @property
    def n_depths(self) -> int:
        return len(self.sites)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for d in range(self.n_depths):
            for p, tok in enumerate(self.str_tokens):
                row: dict[str, Any] = {
                    "layer": d, "site": self.sites[d], "pos": p, "token": tok, "top1": self.top_tokens[d][p][0],
                    "top1_prob": float(self.top_probs[d, p, 0]), "kl_final": float(self.kl[d, p]),
                }
                if self.target_rank is not None and self.target_prob is not None:
                    row["target_rank"] = int(self.target_rank[d, p])
                    row["target_prob"] = float(self.target_prob[d, p])
                row["top"] = " | ".join(f"{t!r} {float(q):.3f}" for t, q in zip(self.top_tokens[d][p], self.top_probs[d, p], strict=True))
                out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        last = len(self.str_tokens) - 1
        out: dict[str, Any] = {"final_top1": self.top_tokens[-1][last][0], "final_top1_prob": float(self.top_probs[-1, last, 0])}
        # First depth from which the final top-1 token stays top-1 at the last position.
        final_id = int(self.top_ids[-1, last, 0])
        settled = self.n_depths - 1
        while settled > 0 and int(self.top_ids[settled - 1, last, 0]) == final_id:
            settled -= 1
        out["final_top1_from_layer"] = settled
        if self.target_rank is not None and self.target_prob is not None:
            out["target"] = self.target
            out["target_rank_final"] = int(self.target_rank[-1, last])
            out["target_prob_final"] = float(self.target_prob[-1, last])
            best = int(self.target_prob[:, last].argmax())
            out["target_prob_max_layer"] = best
        return out

    def figures(self) -> dict[str, Figure]:
        return {"lens.png": plot_lens(self)}


def logit_lens(
    model: Model, prompt: str | torch.Tensor, *, target: str | None = None, top_k: int = 10,
) -> LensResult:
    """Logit lens of one prompt (text, or a [1, pos] / [pos] token tensor)."""
    if top_k < 1:
        raise LensError(f"top_k must be >= 1, got {top_k}")
    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else prompt.reshape(1, -1).long()
    model.check_tokens(tokens)
    if tokens.shape[1] == 0:
        raise LensError("the prompt has no tokens")
    top_k = min(top_k, model.d_vocab)
    target_id = model.single_token_id(target) if target is not None else None
    sites = lens_sites(model)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in set(sites))
        # Per depth, so memory stays one [pos, vocab] tensor at a time rather than [depth, pos, vocab].
        final_logprobs = torch.log_softmax(lens_from_resid(model, cache[sites[-1]][0]).double(), -1)
        top_ids, top_probs, kl, ranks, target_probs = [], [], [], [], []
        for site in sites:
            logits = lens_from_resid(model, cache[site][0]).double()
            logprobs = torch.log_softmax(logits, -1)
            probs, ids = logprobs.exp().topk(top_k, dim=-1)
            top_ids.append(ids)
            top_probs.append(probs)
            kl.append(kl_divergence(final_logprobs, logprobs))
            if target_id is not None:
                ranks.append(1 + (logits > logits[:, target_id : target_id + 1]).sum(-1))
                target_probs.append(logprobs[:, target_id].exp())
    top_ids_t = torch.stack(top_ids)
    return LensResult(
        str_tokens=model.str_tokens(tokens[0]), sites=sites, top_ids=top_ids_t, top_probs=torch.stack(top_probs),
        top_tokens=[[model.str_tokens(row) for row in depth] for depth in top_ids_t], kl=torch.stack(kl),
        target=target, target_id=target_id,
        target_rank=torch.stack(ranks) if ranks else None, target_prob=torch.stack(target_probs) if target_probs else None,
    )
