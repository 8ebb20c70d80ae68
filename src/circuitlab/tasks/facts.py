"""Factual recall (ROME, Meng et al. 2022): "The capital of France is" -> " Paris".

Each fact is (relation template, subject, one-token answer). The corrupt prompt is the same relation with
another subject of the same token length whose answer differs ("The capital of Italy is"), so positions
align and the wrong answer (" Rome") is what the model says on the corrupt prompt. Every example records
its `subject` and the subject's token span [subject_start, subject_end) in positions that count BOS, in
`Example.extra` (so batches carry it as tensors): causal tracing adds noise there.

FACTS holds only facts that SmolLM2-135M answers right top-1 (checked when this module was written, from
146 candidates, 82 kept); `check=True` re-checks them with the given model at run time.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from circuitlab.errors import TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.options import check_n
from circuitlab.tasks.registry import register_task
from circuitlab.tasks.task import Example, Task


@dataclass(frozen=True)
class Fact:
    relation: str  # template with "{}" where the subject goes
    subject: str
    answer: str  # with its leading space, e.g. " Paris"

    @property
    def prompt(self) -> str:
        return self.relation.format(self.subject)


def _facts(relation: str, pairs: str) -> list[Fact]:
    """Facts of one relation from "subject=answer; ..." text."""
    out = []
    for item in pairs.split(";"):
        subject, answer = (s.strip() for s in item.split("="))
        out.append(Fact(relation, subject, " " + answer))
    return out


FACTS: list[Fact] = [
    *_facts(
        "The capital of {} is",
        "France=Paris; Germany=Berlin; Italy=Rome; Japan=Tokyo; Russia=Moscow; China=Beijing; "
        "Greece=Athens; England=London; Portugal=Lisbon; Austria=Vienna; Ireland=Dublin; Norway=Oslo; "
        "Poland=Warsaw; Hungary=Budapest; Canada=Ottawa; Australia=Canberra; Kenya=Nairobi; Iran=Tehran; "
        "Cuba=Havana; Peru=Lima; Denmark=Copenhagen; Finland=Helsinki; Belgium=Brussels; "
        "Sweden=Stockholm; Scotland=Edinburgh; Syria=Damascus; Afghanistan=Kabul; Philippines=Manila; "
        "Chile=Santiago; the Netherlands=Amsterdam; Switzerland=Bern; the Czech Republic=Prague; "
        "Wales=Cardiff",
    ),
    *_facts(
        "{} is located in the city of",
        "The Eiffel Tower=Paris; The Colosseum=Rome; The Acropolis=Athens; The Brandenburg Gate=Berlin; "
        "The Louvre=Paris; The Hagia Sophia=Istanbul; The Tower of London=London; The Vatican=Rome; "
        "The Arc de Triomphe=Paris",
    ),
    *_facts(
        "The official language of {} is",
        "France=French; Germany=German; Spain=Spanish; Mexico=Spanish; Brazil=Portuguese; Italy=Italian; "
        "Japan=Japanese; Russia=Russian; Greece=Greek; the Netherlands=Dutch; Sweden=Swedish; "
        "Poland=Polish; Turkey=Turkish; Egypt=Arabic; Finland=Finnish; Hungary=Hungarian; Israel=Hebrew; "
        "Argentina=Spanish; Austria=German; Iran=Persian",
    ),
    *_facts(
        "The currency of {} is the",
        "Germany=euro; France=euro; Canada=dollar; Italy=euro",
    ),
    *_facts(
        "{} is a city in the country of",
        "Munich=Germany; Barcelona=Spain; Mumbai=India; Manchester=England; Kyoto=Japan; "
        "Hamburg=Germany; Seville=Spain; Marseille=France; Shanghai=China; Istanbul=Turkey; "
        "Krakow=Poland; Vancouver=Canada",
    ),
    *_facts(
        "{} is a product made by",
        "The iPhone=Apple; The Xbox=Microsoft; The PlayStation=Sony; The MacBook=Apple",
    ),
]


@dataclass(frozen=True)
class _Tokenized:
    fact: Fact
    ids: list[int]
    subject_start: int
    subject_end: int
    answer_id: int


def _tokenize(model: Model, fact: Fact) -> _Tokenized | None:
    """Token ids and the subject span; None when the answer is not one token or the span is unstable."""
    answer = model.encode(fact.answer, bos=False)
    if len(answer) != 1:
        return None
    prefix = fact.relation[: fact.relation.index("{}")]
    # The space before the subject belongs to the subject's first token (" France"), so the prefix is
    # encoded without its trailing space.
    start = len(model.encode(prefix.rstrip(" ")))
    with_subject = model.encode(prefix + fact.subject)
    ids = model.encode(fact.prompt)
    if ids[: len(with_subject)] != with_subject or len(with_subject) <= start:
        return None
    return _Tokenized(fact, ids, start, len(with_subject), answer[0])


@torch.no_grad()
def _top1_correct(model: Model, facts: list[_Tokenized]) -> list[bool]:
    """Whether the model's top-1 next token is the answer, one forward per group of equal length."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        by_len[len(f.ids)].append(i)
    correct = [False] * len(facts)
    for idx in by_len.values():
        pred = model.logits(torch.tensor([facts[i].ids for i in idx]))[:, -1].argmax(-1)
        for i, p in zip(idx, pred.tolist(), strict=True):
            correct[i] = p == facts[i].answer_id
    return correct


def usable_facts(model: Model, facts: list[Fact], *, check: bool = False) -> list[tuple[_Tokenized, list[_Tokenized]]]:
    """Facts that tokenize cleanly for the model, each with its corrupt partners (same relation and
    subject length, same prompt length, different answer). With `check`, only facts the model gets right."""
    tokenized = [t for t in (_tokenize(model, f) for f in facts) if t is not None]
    if check and tokenized:
        tokenized = [t for t, ok in zip(tokenized, _top1_correct(model, tokenized), strict=True) if ok]
    groups: dict[tuple[str, int, int], list[_Tokenized]] = defaultdict(list)
    for t in tokenized:
        groups[(t.fact.relation, t.subject_end - t.subject_start, len(t.ids))].append(t)
    out = []
    for t in tokenized:
        key = (t.fact.relation, t.subject_end - t.subject_start, len(t.ids))
        partners = [p for p in groups[key] if p.answer_id != t.answer_id]
        if partners:
            out.append((t, partners))
    return out


@register_task("facts", "Factual recall (ROME): subject -> attribute; corrupt: another subject of equal length")
def make_facts(
    model: Model, *, n: int | None = None, seed: int = 0, check: bool = False,
    facts: list[tuple[str, str, str]] | None = None,
) -> Task:
    """`n` facts (default: all usable) in a seeded order, each with a seeded corrupt partner.

    facts: optional (relation with "{}", subject, answer with leading space) triples replacing FACTS.
    """
    if n is not None:
        check_n(n)
    pool = FACTS if facts is None else [Fact(*f) for f in facts]
    for f in pool:
        if f.relation.count("{}") != 1:
            raise TaskError(f"fact relation {f.relation!r} must contain exactly one '{{}}' for the subject")
    usable = usable_facts(model, pool, check=check)
    if not usable:
        raise TaskError(
            f"no fact has a corrupt partner under {model.spec} (same relation, same subject token length, "
            "different one-token answer); add facts or check the tokenizer"
        )
    if n is not None and n > len(usable):
        raise TaskError(f"only {len(usable)} facts are usable with {model.spec}; ask for n <= {len(usable)}")
    rng = random.Random(seed)
    order = rng.sample(range(len(usable)), len(usable) if n is None else n)
    examples = []
    for i in order:
        t, partners = usable[i]
        p = rng.choice(partners)
        span: dict[str, list | int] = {"subject_start": t.subject_start, "subject_end": t.subject_end}
        examples.append(Example(
            clean=t.fact.prompt, corrupt=p.fact.prompt, answer=[t.fact.answer], wrong=[p.fact.answer],
            subject=t.fact.subject, extra=span,
            meta={"corrupt_subject": p.fact.subject, "relation": t.fact.relation},
        ))
    return Task(
        name="facts", examples=examples, metric="logit_diff",
        description="facts: logit(answer) - logit(corrupt subject's answer); subject span in extra",
        params={"n": len(examples), "seed": seed, "check": check, "n_facts": len(pool)},
    )
