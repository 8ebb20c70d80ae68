"""Document question answering: copy a one-token answer from a short document (docs/METHODS.md,
"Tasks and metrics").

"Document: Alice works at Google in London. Question: Which company does Alice work for? Answer:" ->
" Google". Corrupt: the same prompt with the answer entity in the document replaced by another entity of
the same kind (" Apple"), which becomes the wrong answer; every entity is one token, so clean and corrupt
prompts have the same token length. Each document also names entities of other kinds (a city, a job), so
the question decides what to copy.

A fixed one-shot demonstration (about a different person and question) comes first: without it
SmolLM2-135M follows "Answer:" with a newline or a name (top-1 accuracy 0), with it the copied entity is
top-1 on most prompts. A pet question ("What pet does X have?") was dropped: top-1 accuracy 0 even with
the demonstration. Lower-case answers (colours) accept the capitalised form too (" green" or " Green"),
since after "Answer:" the model capitalises.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from circuitlab.errors import TaskError
from circuitlab.models.model import Model
from circuitlab.tasks.options import check_n, choose_templates
from circuitlab.tasks.registry import register_task
from circuitlab.tasks.task import Example, Task


@dataclass(frozen=True)
class QATemplate:
    """A document + question with {SLOT} fields; a slot's kind is its name without trailing digits."""

    text: str
    answer_slot: str

    @property
    def slots(self) -> list[str]:
        return list(dict.fromkeys(re.findall(r"\{(\w+)\}", self.text)))


DEMO = "Document: Lucy is a baker. She works at Ford in Leeds. Question: Where does Lucy live? Answer: Leeds\n"
TEMPLATES = [
    QATemplate("Document: {NAME} works at {COMPANY} in {CITY}. Question: Which company does {NAME} work for? Answer:", "COMPANY"),
    QATemplate("Document: {NAME} works at {COMPANY} in {CITY}. Question: In which city does {NAME} work? Answer:", "CITY"),
    QATemplate("Document: {NAME} is a {JOB}. {NAME} drives a {COLOR} car. Question: What color is {NAME}'s car? Answer:", "COLOR"),
]
ENTITIES = {
    "NAME": ["Alice", "Bob", "Mary", "John", "Tom", "Anna", "Kate", "Peter", "Sarah", "David", "Emma", "Jack"],
    "COMPANY": ["Google", "Microsoft", "Apple", "Amazon", "Intel", "Samsung", "Sony", "Nike", "Tesla", "IBM", "Netflix", "Adobe"],
    "CITY": ["London", "Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Boston", "Chicago", "Sydney", "Dublin", "Vienna", "Moscow"],
    "COLOR": ["red", "blue", "green", "black", "white", "yellow", "silver", "brown"],
    "JOB": ["doctor", "teacher", "lawyer", "nurse", "pilot", "chef", "farmer", "writer"],
}


def _kind(slot: str) -> str:
    return slot.rstrip("0123456789")


def _answer_forms(model: Model, entity: str) -> list[str]:
    """The entity with a leading space, plus its capitalised form when that is one token too."""
    forms = [" " + entity]
    capital = model.encode(" " + entity.capitalize(), bos=False)
    unknown = getattr(model.tokenizer, "unk_token_id", None)
    if entity.islower() and len(capital) == 1 and capital[0] != unknown:
        forms.append(" " + entity.capitalize())
    return forms


def _single_token_entities(model: Model) -> dict[str, list[str]]:
    """Entities that are one token with a leading space (answers follow "Answer:" with a space)."""
    return {k: [e for e in v if model.is_single_token(" " + e)] for k, v in ENTITIES.items()}


@register_task("qa", "Copy a one-token answer from a short document; corrupt: answer entity replaced")
def make_qa(model: Model, *, n: int = 40, seed: int = 0, templates: list[int] | None = None) -> Task:
    """`n` seeded prompts cycling over the templates; entities within one prompt are distinct."""
    check_n(n)
    chosen = choose_templates("QA", templates, len(TEMPLATES))
    pool = _single_token_entities(model)
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        template = TEMPLATES[chosen[i % len(chosen)]]
        kinds = [_kind(s) for s in template.slots]
        need = {k: kinds.count(k) + (k == template.answer_slot) for k in kinds}  # +1: the corrupt entity
        for kind, count in need.items():
            if len(pool[kind]) < count:
                raise TaskError(f"{model.spec}'s tokenizer has too few single-token {kind} entities for QA")
        drawn = {k: rng.sample(pool[k], c) for k, c in need.items()}
        fill = {slot: drawn[_kind(slot)].pop(0) for slot in template.slots}
        replacement = drawn[template.answer_slot].pop(0)
        answer = fill[template.answer_slot]
        clean = DEMO + template.text.format(**fill)
        corrupt = DEMO + template.text.format(**{**fill, template.answer_slot: replacement})
        examples.append(Example(
            clean=clean, corrupt=corrupt, answer=_answer_forms(model, answer), wrong=_answer_forms(model, replacement),
            meta={"template": chosen[i % len(chosen)], "answer_kind": template.answer_slot},
        ))
    return Task(
        name="qa", examples=examples, metric="logit_diff",
        description="QA: logit(answer copied from the document) - logit(the corrupt document's entity)",
        params={"n": n, "seed": seed, "templates": chosen},
    )
