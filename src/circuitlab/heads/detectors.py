"""Head detectors: how much of each head's attention follows a known pattern.

A *detection pattern* D[dest, src] is 1 where a head of a given kind should attend and 0 elsewhere. The
three kinds are TransformerLens' ``head_detector`` patterns (Olsson et al. 2022, "In-context Learning and
Induction Heads"), built from the tokens:

- previous-token: D[i, i-1] = 1 (every position attends to the one before it);
- duplicate-token: D[i, j] = 1 for j < i with token j == token i (an earlier copy of the current token);
- induction: D[i, j] = 1 for 0 < j <= i with token j-1 == token i, j-1 < i (the token after an earlier
  copy of the current token: the one an induction head predicts next).

On a sequence of random tokens repeated twice, BOS + x + x (`repeated_random_tokens`), every position of
the second copy has exactly one duplicate and one induction target, and no position of the first copy has
either. A head's score (`detector_scores`) is TransformerLens' ``"mul"`` measure, sum(A * D) / sum(A),
averaged over sequences. With ``rows="all"`` (TransformerLens' definition, its defaults
``exclude_bos=False``, ``exclude_current_token=False``) the denominator counts every query position, so a
perfect induction head on BOS + x + x scores n / (2n + 1) < 0.5. With ``rows="targets"`` (what circuitlab
reports) it counts only the positions that have a target, so the score is the mean share of attention a
head puts on its targets where it has any: 1 = a perfect head, whatever the sequence length.

Attention to BOS (`bos_attention`): the mean share of attention from positions 1.. to position 0 (an
*attention sink*, Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

Each score comes with the score of a uniform causal head (every position attends equally to itself and
all earlier positions) on the same tokens: the chance level a real score must rise above.
See docs/METHODS.md, "Head analysis".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int

from circuitlab.attribution.attention_flow import attention_patterns as attention_patterns_by_batch
from circuitlab.errors import HeadsError
from circuitlab.models.model import Model

DETECTORS = ("prev_token", "duplicate_token", "induction")
Rows = Literal["targets", "all"]
NO_TOKENIZER_BOS = 0  # token 0 stands for BOS in models without a tokenizer (as in the ground-truth models)


# --- inputs --------------------------------------------------------------------------------------------------

def repeated_random_tokens(model: Model, n_tokens: int, n_sequences: int, *, seed: int = 0) -> Int[torch.Tensor, "seq pos"]:
    """`n_sequences` rows of BOS + x + x, x being `n_tokens` distinct random non-special token ids.

    Distinct tokens make each second-copy position's duplicate and induction targets unique. BOS is the
    model's BOS token, or token 0 for a model without a tokenizer.
    """
    if n_tokens < 1 or n_sequences < 1:
        raise HeadsError(f"need at least one token and one sequence, got {n_tokens} and {n_sequences}")
    length = 1 + 2 * n_tokens
    if length > model.n_ctx:
        raise HeadsError(f"BOS + 2 x {n_tokens} repeated tokens is {length} tokens, more than {model.spec}'s "
                         f"context of {model.n_ctx}; use at most {(model.n_ctx - 1) // 2} repeated tokens")
    bos = model.bos_token_id if model.bos_token_id is not None else NO_TOKENIZER_BOS
    special = {bos, *(getattr(model.tokenizer, "all_special_ids", None) or [])}
    candidates = torch.tensor([t for t in range(model.d_vocab) if t not in special])
    if len(candidates) < n_tokens:
        raise HeadsError(f"{n_tokens} distinct random tokens do not fit {model.spec}'s {len(candidates)} ordinary "
                         f"tokens; use at most {len(candidates)}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_sequences):
        x = candidates[torch.randperm(len(candidates), generator=generator)[:n_tokens]]
        rows.append(torch.cat([torch.tensor([bos]), x, x]))
    return torch.stack(rows)


def attention_patterns(model: Model, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "layer batch head dest src"]:
    """Every layer's attention pattern on `tokens` (the bridge's ``pattern`` hook), layer first."""
    return attention_patterns_by_batch(model, tokens).transpose(0, 1)


# --- detection patterns and scores ---------------------------------------------------------------------------

def detection_pattern(kind: str, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch dest src"]:
    """The 0/1 pattern a head of `kind` (one of DETECTORS) would follow on `tokens` (TransformerLens'
    ``get_*_detection_pattern``, batched)."""
    n_pos = tokens.shape[-1]
    causal = torch.ones(n_pos, n_pos).tril()
    if kind == "prev_token":
        return torch.diag(torch.ones(n_pos - 1), -1).expand(tokens.shape[0], n_pos, n_pos).clone()
    same = (tokens[:, :, None] == tokens[:, None, :]).float() * causal
    duplicate = same * (1 - torch.eye(n_pos))  # a token is always a copy of itself: not a duplicate
    if kind == "duplicate_token":
        return duplicate
    if kind == "induction":
        shifted = torch.zeros_like(duplicate)
        shifted[:, :, 1:] = duplicate[:, :, :-1]  # the position after each earlier copy
        return shifted * causal
    raise HeadsError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")


def detector_scores(
    patterns: Float[torch.Tensor, "layer batch head dest src"], detection: Float[torch.Tensor, "batch dest src"], *,
    rows: Rows = "targets", exclude_bos: bool = False, exclude_current_token: bool = False,
) -> Float[torch.Tensor, "layer head"]:
    """Each head's share of attention on the detection pattern, sum(A * D) / sum(A), averaged over sequences.

    rows: "all" divides by the attention of every query position (TransformerLens' ``"mul"`` measure);
    "targets" only by that of positions where D has a target (1 = a perfect head).
    exclude_bos / exclude_current_token: zero the attention to position 0 / to the query itself first, as
    TransformerLens does (its defaults: both False).
    """
    attention = patterns
    if exclude_bos or exclude_current_token:
        attention = patterns.clone()
        if exclude_bos:
            attention[..., 0] = 0
        if exclude_current_token:
            attention = attention * (1 - torch.eye(patterns.shape[-1], dtype=patterns.dtype))
    detection = detection.to(patterns.dtype)
    hit = torch.einsum("lbhqk,bqk->lbh", attention, detection)
    if rows == "all":
        total = attention.sum((-2, -1))
    elif rows == "targets":
        has_target = detection.amax(-1)  # [batch, dest]: 1 where the position has a target
        if bool((has_target.sum(-1) == 0).any()):
            raise HeadsError("a sequence has no position with a target for this detector (nothing repeats)")
        total = torch.einsum("lbhqk,bq->lbh", attention, has_target)
    else:
        raise HeadsError(f"rows must be 'targets' or 'all', got {rows!r}")
    return (hit / total).mean(1)


def bos_attention(patterns: Float[torch.Tensor, "layer batch head dest src"]) -> tuple[Float[torch.Tensor, "layer head"], int]:
    """(sum over sequences and positions 1.. of the attention to position 0, the number of those positions):
    summed, so prompts of several lengths combine into one mean."""
    return patterns[..., 1:, 0].sum((1, 3)), patterns.shape[1] * (patterns.shape[-2] - 1)


def uniform_patterns(n_batch: int, n_pos: int) -> Float[torch.Tensor, "1 batch 1 dest src"]:
    """A uniform causal head: each position attends equally to itself and every earlier position."""
    causal = torch.ones(n_pos, n_pos).tril()
    return (causal / causal.sum(-1, keepdim=True)).expand(1, n_batch, 1, n_pos, n_pos)


# --- the ground-truth procedure (position-based: BOS + x + x with distinct x) -------------------------------

def previous_token_scores(patterns: Float[torch.Tensor, "layer batch head dest src"]) -> Float[torch.Tensor, "layer head"]:
    """Mean attention from each position i >= 1 to position i - 1."""
    n_pos = patterns.shape[-1]
    dest = torch.arange(1, n_pos)
    return patterns[..., dest, dest - 1].mean(dim=(1, 3))


def induction_scores(patterns: Float[torch.Tensor, "layer batch head dest src"], seq_len: int) -> Float[torch.Tensor, "layer head"]:
    """Mean attention from each second-copy position of BOS + x + x to its induction source.

    At position 1 + seq_len + i (token x_i) the source is the position after x_i's first occurrence,
    2 + i; for the last token that is the start of the second copy, 1 + seq_len.
    """
    dest = torch.arange(1 + seq_len, 1 + 2 * seq_len)
    src = dest - seq_len + 1
    return patterns[..., dest, src].mean(dim=(1, 3))


# --- every detector on one model -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadScores:
    """Per-head scores [layer, head] by detector name (DETECTORS and "bos"), with each one's chance level
    (a uniform causal head on the same tokens), and where the BOS attention was measured."""

    scores: dict[str, Float[torch.Tensor, "layer head"]]
    uniform: dict[str, float]
    tokens: Int[torch.Tensor, "seq pos"]
    bos_source: str


def detect_heads(model: Model, *, n_tokens: int = 20, n_sequences: int = 4, seed: int = 0,
                 bos_prompts: Iterable[Int[torch.Tensor, "batch pos"]] | None = None,
                 bos_source: str = "repeated tokens") -> HeadScores:
    """Every detector over every head on `n_sequences` repeated random sequences; attention to BOS on
    `bos_prompts` (batches of equal-length prompts, e.g. a task's) or, without them, on the same sequences."""
    tokens = repeated_random_tokens(model, n_tokens, n_sequences, seed=seed)
    patterns = attention_patterns(model, tokens)
    uniform = uniform_patterns(*tokens.shape)
    scores, chance = {}, {}
    for kind in DETECTORS:
        detection = detection_pattern(kind, tokens)
        scores[kind] = detector_scores(patterns, detection)
        chance[kind] = float(detector_scores(uniform, detection))
    batches = list(bos_prompts) if bos_prompts is not None else [tokens]
    total, count, chance_total = torch.zeros(model.n_layers, model.n_heads), 0, 0.0
    for batch in batches:
        if batch.shape[-1] < 2:
            continue  # a one-token prompt has no position that could attend past itself
        summed, n = bos_attention(attention_patterns(model, batch) if batch is not tokens else patterns)
        total, count = total + summed, count + n
        chance_total += float(bos_attention(uniform_patterns(*batch.shape))[0])
    if count == 0:
        raise HeadsError("attention to BOS needs prompts of at least two tokens")
    scores["bos"], chance["bos"] = total / count, chance_total / count
    return HeadScores(scores, chance, tokens, bos_source if bos_prompts is not None else "repeated tokens")
