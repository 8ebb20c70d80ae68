"""Induction on repeated random tokens (Olsson et al. 2022; the TransformerLens / ARENA induction demo).

Clean: BOS + L random tokens + the same L tokens again. Corrupt: BOS + the same first L tokens + L fresh
random tokens (nothing repeats, so nothing can be copied). Scored positions are the L positions of the
second copy: at position L + k the current token t_k occurred before at position k, followed by t_{k+1}
(for k = L the follower is the first token of the second copy, t_1), so an induction head can predict it.
The metric `induction_logprob` is the mean log-prob of those targets; the corrupt run is scored on the
same targets. The task is token-level: ids travel in `Example.clean_ids` / `corrupt_ids` / `targets`
(decoded text would not round-trip).
"""

from __future__ import annotations

import random
import re
from functools import cache

import torch
from jaxtyping import Float

from circuitlab.errors import MetricError, TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import register_metric
from circuitlab.tasks.options import check_n
from circuitlab.tasks.registry import register_task
from circuitlab.tasks.task import Example, Task, TaskBatch

# A lower-case word token with a leading space (" house"), as in subword vocabularies; word-level toy
# tokenizers have no leading spaces, so plain words are the fallback.
_SPACED_WORD = re.compile(r" [a-z]{3,}")
_PLAIN_WORD = re.compile(r"[A-Za-z]{2,}")


@cache
def _word_pool(tokenizer: object, vocab_size: int) -> tuple[int, ...]:
    """Ids of ordinary word tokens (no special tokens), sorted so seeded sampling is reproducible."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids = [i for i in range(vocab_size) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])  # type: ignore[attr-defined]
    spaced = tuple(i for i, t in zip(ids, texts, strict=True) if _SPACED_WORD.fullmatch(t))
    if len(spaced) >= 100:
        return spaced
    return tuple(i for i, t in zip(ids, texts, strict=True) if _PLAIN_WORD.fullmatch(t))


def word_token_pool(model: Model, pool_size: int = 5000) -> list[int]:
    """The first `pool_size` word tokens in id order, which BPE vocabularies sort by merge order, i.e.
    the most frequent words. Rare word pieces (" marsup") make SmolLM2's induction much weaker: with
    seq_len 10 the clean mean log-prob is -9.7 over all 30k word tokens and -5.1 over the first 5k."""
    if model.tokenizer is None:
        raise TaskError("the induction task samples words from the tokenizer; this model has none")
    vocab = min(len(model.tokenizer), model.d_vocab)
    return list(_word_pool(model.tokenizer, vocab)[:pool_size])


@register_metric("induction_logprob")
def induction_logprob(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """Mean over scored positions (targets >= 0) of log P(target token) predicted at that position."""
    if batch.targets is None:
        raise MetricError(
            "induction_logprob scores per-position targets, but this task has none; use it with the "
            "'induction' task (or give each Example `targets`, with -1 for unscored positions)"
        )
    logp = torch.log_softmax(logits, -1)  # [batch, pos, vocab]
    mask = batch.targets >= 0
    picked = logp.gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]  # [batch, pos]
    return (picked * mask).sum(1) / mask.sum(1).clamp(min=1)


@register_task("induction", "Repeated random word tokens; mean log-prob of the second copy (corrupt: no repeat)")
def make_induction(model: Model, *, n: int = 32, seed: int = 0, seq_len: int = 10, pool_size: int = 5000) -> Task:
    """`n` seeded sequences BOS + x + x (clean) and BOS + x + y (corrupt), x and y of `seq_len` tokens.

    The 2 * seq_len tokens of one example are distinct, so each token of the second copy has exactly
    one earlier occurrence to copy from.
    """
    check_n(n)
    if seq_len < 2:
        raise TaskError(f"seq_len must be >= 2 (tokens per copy), got {seq_len}")
    if 1 + 2 * seq_len > model.n_ctx:
        raise TaskError(f"seq_len {seq_len} gives {1 + 2 * seq_len} tokens, over {model.spec}'s context of {model.n_ctx}")
    if pool_size < 1:
        raise TaskError(f"pool_size must be >= 1, got {pool_size}")
    pool = word_token_pool(model, pool_size)
    if len(pool) < 2 * seq_len:
        raise TaskError(
            f"{model.spec}'s vocabulary has only {len(pool)} word tokens; induction with seq_len {seq_len} "
            f"needs {2 * seq_len} distinct ones, so lower seq_len"
        )
    bos = [model.bos_token_id] if model.bos_token_id is not None else []
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        tokens = rng.sample(pool, 2 * seq_len)
        first, fresh = tokens[:seq_len], tokens[seq_len:]
        clean, corrupt = bos + first + first, bos + first + fresh
        offset = len(bos) + seq_len  # position of the first token of the second copy
        # At offset + k (token first[k]) the next token after its earlier occurrence is first[k + 1],
        # or first[0] (the start of the second copy) for the last token.
        targets = [-1] * offset + first[1:] + first[:1]
        examples.append(Example(
            clean=model.decode(clean), corrupt=model.decode(corrupt),
            answer=[model.decode(first[:1])], wrong=[],
            clean_ids=clean, corrupt_ids=corrupt, answer_ids=[first[0]], targets=targets,
        ))
    return Task(
        name="induction", examples=examples, metric="induction_logprob", single_token_answers=True,
        description="mean log-prob of each second-copy token's induction target (top-1 at the last position)",
        params={"n": n, "seed": seed, "seq_len": seq_len, "pool_size": pool_size},
    )
