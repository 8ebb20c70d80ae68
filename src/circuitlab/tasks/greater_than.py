"""Greater-than (Hanna et al. 2023) for tokenizers that split numbers into single digits (SmolLM2, Llama).

Hanna et al. score "The war lasted from the year 1732 to the year 17" -> a two-digit token YY > 32. With
one token per digit, YY is two next-token steps, so the prompt ends with the start year's tens digit
appended: "... from the year 1732 to the year 173". One forward pass then gives
  P_tens(d)  = P(tens digit = d)                at position -2 (the hundreds digit "7" of the end year),
  P_units(u) = P(units digit = u | tens = t)    at position -1 (the appended tens digit t),
and the metric `greater_than_prob_diff` is P(YY > yy) - P(YY < yy) with, for start yy = 10 t + u0,
  P(YY > yy) = sum_{d > t} P_tens(d) + P_tens(t) * sum_{u > u0} P_units(u)
  P(YY < yy) = sum_{d < t} P_tens(d) + P_tens(t) * sum_{u < u0} P_units(u).
Both distributions are renormalised over the ten digit tokens (a softmax restricted to "0".."9"), so the
metric lies in [-1, 1] and measures the ordering of years, not how much mass the model gives to digits.

Corrupt (as in the paper): start year XX01, "from the year 1701 to the year 170" (same token length). The
corrupt run is scored with the clean example's yy; its units distribution is conditioned on its own
appended digit "0".

Start years: yy = 10 t + u0 with t in 1..8 and u0 in 1..8. u0 in 1..8 keeps both the later and the earlier
units sets non-empty (answer/wrong sets for top-1 accuracy and logit_diff); t <= 8 keeps a later decade
possible; t >= 1 keeps the clean year apart from the corrupt "01".
"""

from __future__ import annotations

import random

import torch
from jaxtyping import Float

from circuitlab.errors import MetricError, TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import register_metric
from circuitlab.tasks.options import check_n
from circuitlab.tasks.registry import register_task
from circuitlab.tasks.task import Example, Task, TaskBatch

TEMPLATE = "The {NOUN} lasted from the year {START} to the year {END}"
# Nouns from Hanna et al. (2023); kept when they are one token (with a leading space) for the model.
NOUNS = [
    "war", "expedition", "deal", "project", "trip", "reign", "siege", "journey", "treaty", "marriage",
    "dynasty", "campaign", "study", "program", "tour", "trial", "voyage", "plague", "rivalry", "kingdom",
    "friendship", "rule", "relationship", "occupation", "investigation", "contract", "strike", "conflict",
    "construction", "crisis",
]
CENTURIES = [11, 12, 13, 14, 15, 16, 17, 18]
TENS, UNITS = range(1, 9), range(1, 9)


def digit_ids(model: Model) -> list[int]:
    """Token ids of "0".."9"; a clear error when digits are not single tokens."""
    ids = []
    for d in range(10):
        enc = model.encode(str(d), bos=False)
        if len(enc) != 1:
            raise TaskError(f"greater-than needs single-token digits, but {d!r} is {model.str_tokens(enc)} in {model.spec}")
        ids.append(enc[0])
    return ids


def _check_digit_split(model: Model, prompt: str, year: str, digits: list[int]) -> None:
    """The prompt's last len(year) tokens must be the year's digits, one token each."""
    ids = model.encode(prompt)
    want = [digits[int(c)] for c in year]
    if ids[-len(want):] != want:
        raise TaskError(
            f"greater-than needs a tokenizer that splits numbers into single digits (SmolLM2, Llama do); "
            f"{model.spec} tokenizes {prompt!r} as {model.str_tokens(ids)}"
        )


@register_metric("greater_than_prob_diff")
def greater_than_prob_diff(logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
    """P(YY > yy) - P(YY < yy) from the tens step (answer_pos - 1) and the units step (answer_pos).

    Needs batch.extra["yy"] [batch] (start year's last two digits) and batch.extra["digit_ids"] [batch, 10].
    """
    if "yy" not in batch.extra or "digit_ids" not in batch.extra:
        raise MetricError("greater_than_prob_diff needs the 'greater-than' task (extra 'yy' and 'digit_ids')")
    rows = torch.arange(logits.shape[0])
    digits = batch.extra["digit_ids"]  # [batch, 10]

    def digit_probs(pos: torch.Tensor) -> torch.Tensor:  # [batch, 10], renormalised over digits
        return torch.softmax(logits[rows, pos].gather(-1, digits), -1)

    p_tens, p_units = digit_probs(batch.answer_pos - 1), digit_probs(batch.answer_pos)
    t, u0 = (batch.extra["yy"] // 10)[:, None], (batch.extra["yy"] % 10)[:, None]
    d = torch.arange(10, device=logits.device)[None, :]
    p_same_decade = p_tens.gather(1, t)[:, 0]
    later = (p_tens * (d > t)).sum(1) + p_same_decade * (p_units * (d > u0)).sum(1)
    earlier = (p_tens * (d < t)).sum(1) + p_same_decade * (p_units * (d < u0)).sum(1)
    return later - earlier


@register_task("greater-than", "Year span 'from 1732 to 173_' (Hanna et al. 2023), digit tokens; corrupt: start year XX01")
def make_greater_than(model: Model, *, n: int = 64, seed: int = 0) -> Task:
    """`n` seeded prompts over nouns, centuries and start years yy in {t u0: t, u0 in 1..8}."""
    check_n(n)
    digits = digit_ids(model)
    nouns = [w for w in NOUNS if len(model.encode(" " + w, bos=False)) == 1]
    if not nouns:
        raise TaskError(f"none of the greater-than nouns is a single token in {model.spec}'s tokenizer")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        noun, xx = rng.choice(nouns), rng.choice(CENTURIES)
        t, u0 = rng.choice(TENS), rng.choice(UNITS)
        start, corrupt_start = f"{xx}{t}{u0}", f"{xx}01"
        clean = TEMPLATE.format(NOUN=noun, START=start, END=f"{xx}{t}")
        corrupt = TEMPLATE.format(NOUN=noun, START=corrupt_start, END=f"{xx}0")
        _check_digit_split(model, clean, f"{xx}{t}", digits)
        _check_digit_split(model, clean[: clean.index(" to the")], start, digits)
        examples.append(Example(
            clean=clean, corrupt=corrupt,
            answer=[str(u) for u in range(u0 + 1, 10)], wrong=[str(u) for u in range(u0)],
            extra={"yy": 10 * t + u0, "digit_ids": digits}, meta={"noun": noun, "start": int(start)},
        ))
    return Task(
        name="greater-than", examples=examples, metric="greater_than_prob_diff",
        description="P(end year > start) - P(end year < start), tens and units digit steps in one forward",
        params={"n": n, "seed": seed, "digit_renormalised": True},
    )
