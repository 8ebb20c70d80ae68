"""Indirect object identification (Wang et al. 2022): "When Mary and John went to the store, John gave a
drink to" -> " Mary". Answer = the indirect object (IO), wrong = the subject (S).

Corruptions: `abc` (the standard one: the same template with three different names, none of A or B), and
`swap` (S2 replaced by the IO name, so the clean answer becomes the wrong one).
"""

from __future__ import annotations

import random

from circuitlab.errors import TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.options import check_n, choose_templates
from circuitlab.tasks.registry import register_task
from circuitlab.tasks.task import Example, Task

# {A} = IO, {B} = S in ABBA order; BABA swaps the first two names.
# Templates and names checked on SmolLM2-135M (seed 1, 64 prompts per template): each template has top-1
# accuracy >= 0.95 and mean logit difference >= 3.9 (all: 0.975, 4.68). Dropped as weak (96 prompts each,
# old name list): "After X and Y went to ..., S gave" (acc 0.94), "While X and Y were working at the ..."
# (acc 0.90), "Then, X and Y had a lot of fun at the ..." (0.84), "Friends X and Y found a ..." (ABBA fails).
TEMPLATES = [
    "When {X} and {Y} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After the lunch, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {X} and {Y} had a long argument. Afterwards {S} said to",
]
# Names the model predicts reliably as the IO; Paul, Henry, Daniel, Eric, Michael, Mark, Jane, Chris,
# Steve and James were dropped (mean log P(IO) < -1.0 as the answer), Joe (often predicted as the S).
NAMES = [
    "Mary", "John", "Tom", "Sarah", "Anna", "David", "Peter", "Laura", "Kate", "Emma", "Lisa", "Jack",
    "Alice", "Bob", "Rachel", "Adam", "Amy", "Ben", "Ryan", "Sam", "Tim", "Linda", "Susan", "George", "Helen",
]
PLACES = ["store", "park", "school", "office", "hospital", "station", "restaurant", "garden", "market", "house"]
# "key" dropped: "gave a key to" continues with " the" too often.
OBJECTS = ["drink", "book", "ring", "ball", "gift", "letter", "bag", "cake", "computer"]


def _single_tokens(model: Model, words: list[str]) -> list[str]:
    return [w for w in words if model.is_single_token(" " + w)]


@register_task("ioi", "Indirect object identification (Wang et al. 2022), ABBA+BABA, ABC or name-swap corruption")
def make_ioi(
    model: Model, *, n: int = 64, seed: int = 0, corruption: str = "abc", templates: list[int] | None = None,
    orders: tuple[str, ...] = ("ABBA", "BABA"),
) -> Task:
    """`n` seeded IOI prompts cycling over templates and ABBA/BABA orders.

    Names, places and objects are filtered to single tokens (with a leading space) in the model's tokenizer,
    so every prompt of one template has the same token length and clean/corrupt positions align.
    """
    if corruption not in ("abc", "swap"):
        raise TaskError(f"unknown IOI corruption {corruption!r}; use 'abc' or 'swap'")
    check_n(n)
    chosen = choose_templates("IOI", templates, len(TEMPLATES))
    names = _single_tokens(model, NAMES)
    places, objects = _single_tokens(model, PLACES), _single_tokens(model, OBJECTS)
    if len(names) < 5 or not places or not objects:
        raise TaskError(f"{model.spec}'s tokenizer has too few single-token names/places/objects for IOI")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        template = TEMPLATES[chosen[i % len(chosen)]]
        order = orders[(i // len(chosen)) % len(orders)]
        io, s, c1, c2, c3 = rng.sample(names, 5)
        fill = {"PLACE": rng.choice(places), "OBJECT": rng.choice(objects)}
        x, y = (io, s) if order == "ABBA" else (s, io)
        clean = template.format(X=x, Y=y, S=s, **fill)
        if corruption == "abc":
            cx, cy = (c1, c2) if order == "ABBA" else (c2, c1)
            corrupt = template.format(X=cx, Y=cy, S=c3, **fill)
        else:
            corrupt = template.format(X=x, Y=y, S=io, **fill)
        examples.append(Example(
            clean=clean, corrupt=corrupt, answer=[" " + io], wrong=[" " + s],
            meta={"template": chosen[i % len(chosen)], "order": order, "io": io, "s": s},
        ))
    return Task(
        name="ioi", examples=examples, metric="logit_diff",
        description="IOI: logit(IO) - logit(S) at the final position",
        params={"n": n, "seed": seed, "corruption": corruption, "templates": chosen, "orders": list(orders)},
    )
