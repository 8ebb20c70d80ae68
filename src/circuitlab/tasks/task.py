"""Contrastive tasks: clean/corrupt prompt pairs with answers, and their tokenized, validated form.

A `Task` is model-independent text. `Task.prepare(model)` tokenizes it under the model's BOS policy,
validates it (single-token answers, aligned clean/corrupt lengths, context length) and groups prompts of
equal token length into `TaskBatch`es. Prompts of different lengths are grouped, not padded: positions then
mean the same thing inside each batch and no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import TaskError, TokenizationError
from circuitlab.models.model import Model
from circuitlab.tasks.metrics import check_output_width, get_metric, needs_answers
from circuitlab.tasks.options import check_n

# Example fields that analyses read; anything else a task carries is free-form `meta`.
STRUCTURAL_FIELDS = ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "answer_pos", "targets", "subject",
                     "extra")


@dataclass
class Example:
    """One contrastive pair. `answer`/`wrong` are answer sets (lists of strings, each one token).

    Optional structural fields, read by `Task.prepare` and the analyses:
    - clean_ids, corrupt_ids: the prompts as token ids, used as given (no BOS is added), for token-level
      tasks whose text would not round-trip through the tokenizer (induction on random tokens) and for
      models without a tokenizer;
    - answer_ids, wrong_ids: the answer sets as token ids (instead of tokenizing `answer` / `wrong`),
      indexing the model's logits (0 to d_vocab_out - 1);
    - answer_pos: the position whose next-token logits are scored (default: the last; negative counts
      from the end);
    - targets: one token id per clean position for per-position metrics, -1 where not scored;
    - subject: the subject string as written in the clean prompt (causal tracing noises it);
    - extra: per-example numbers that batches carry as tensors for a task's own metric.
    `meta` holds free-form fields only (a template index, the names used, ...); no analysis reads it.
    """

    clean: str
    corrupt: str
    answer: list[str]
    wrong: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    clean_ids: list[int] | None = None
    corrupt_ids: list[int] | None = None
    answer_ids: list[int] | None = None
    wrong_ids: list[int] | None = None
    answer_pos: int | None = None
    targets: list[int] | None = None
    subject: str | None = None
    extra: dict[str, list | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.answer, str):
            self.answer = [self.answer]
        if isinstance(self.wrong, str):
            self.wrong = [self.wrong]
        if not isinstance(self.meta, dict):
            raise TaskError(f"field 'meta' must be a dict of free-form fields, got {type(self.meta).__name__}")
        # Before these fields existed, tasks put them in `meta`; that spelling still works.
        if any(key in self.meta for key in STRUCTURAL_FIELDS):
            self.meta = dict(self.meta)
            for key in STRUCTURAL_FIELDS:
                if key in self.meta:
                    value = self.meta.pop(key)
                    if getattr(self, key) in (None, {}):
                        setattr(self, key, value)
        _check_example_types(self)


def _check_example_types(ex: Example) -> None:
    """TaskError naming the field whose value has the wrong type (JSON files can hold anything)."""
    def fail(name: str, want: str, value: object) -> None:
        raise TaskError(f"field {name!r} must be {want}, got {type(value).__name__} {_short(value)}")

    for name in ("clean", "corrupt"):
        if not isinstance(getattr(ex, name), str):
            fail(name, "a string", getattr(ex, name))
    for name in ("answer", "wrong"):
        value = getattr(ex, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(name, "a string or a list of strings", value)
    for name in ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "targets"):
        value = getattr(ex, name)
        if value is not None and not (isinstance(value, list) and all(_is_int(v) for v in value)):
            fail(name, "a list of integer token ids", value)
    if ex.answer_pos is not None and not _is_int(ex.answer_pos):
        fail("answer_pos", "an integer position", ex.answer_pos)
    if ex.subject is not None and not isinstance(ex.subject, str):
        fail("subject", "a string", ex.subject)
    if not isinstance(ex.extra, dict) or not all(
        isinstance(k, str) and (_is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)))
        for k, v in ex.extra.items()
    ):
        fail("extra", "an object of integers or lists of integers", ex.extra)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Task:
    """A named list of examples plus the metric that scores them.

    align: clean and corrupt prompts must have the same token length (needed by position-wise patching).
    single_token_answers: every answer/wrong string must be one token.
    require_answers: False lets examples omit their answers, for scores that compare with the full model
    instead (circuit discovery's kl and l2); `has_answers` says whether every example gives one.
    """

    name: str
    examples: list[Example]
    metric: str = "logit_diff"
    align: bool = True
    single_token_answers: bool = True
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    require_answers: bool = True

    def __post_init__(self) -> None:
        if not self.examples:
            raise TaskError(f"task {self.name!r} has no examples; a task needs at least one clean/corrupt pair")
        get_metric(self.metric)  # unknown metric: clear error now, not mid-run

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_answers(self) -> bool:
        """Whether every example gives an answer (text or ids)."""
        return all(ex.answer or ex.answer_ids for ex in self.examples)

    def subset(self, n: int | None) -> Task:
        """The first `n` examples (all when n is None)."""
        if n is None:
            return self
        check_n(n)
        return replace(self, examples=self.examples[:n])

    def with_metric(self, metric: str) -> Task:
        return replace(self, metric=metric)

    def info(self) -> dict[str, Any]:
        """The plain-data description recorded as `task` in every results.json."""
        return {"name": self.name, "n": len(self), "metric": self.metric, "params": self.params}

    def to_records(self) -> list[dict]:
        return [asdict(e) for e in self.examples]

    def prepare(self, model: Model) -> PreparedTask:
        return PreparedTask.build(self, model)


def prompt_task(prompt: str, answer: str, wrong: str | None = None, corrupt: str | None = None) -> Task:
    """A one-prompt task (e.g. from the command line): logit difference when a wrong answer is given, else
    log P(answer). Without `corrupt` the clean prompt stands in, and `params['has_corrupt']` is False so
    methods that need a corruption can say so."""
    example = Example(clean=prompt, corrupt=corrupt or prompt, answer=[answer], wrong=[wrong] if wrong else [])
    return Task("prompt", [example], metric="logit_diff" if wrong else "logprob",
                params={"has_corrupt": corrupt is not None})


@dataclass
class TaskBatch:
    """Prompts of one token length, ready to run.

    clean, corrupt: [batch, pos] token ids. answers, wrong: [batch, n] ids padded with -1.
    answer_pos: [batch] position whose logits are scored. targets: optional [batch, pos] ids for
    per-position metrics (-1 = not scored). reference_logprobs: clean log-probs for the 'kl' metric.
    """

    clean: Int[torch.Tensor, "batch pos"]
    corrupt: Int[torch.Tensor, "batch pos_c"]
    answers: Int[torch.Tensor, "batch n_answer"]
    wrong: Int[torch.Tensor, "batch n_wrong"]
    answer_pos: Int[torch.Tensor, " batch"]
    indices: list[int]
    targets: Int[torch.Tensor, "batch pos"] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_logprobs: Float[torch.Tensor, "batch vocab"] | None = None

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.clean.shape[1])

    def select(self, rows: slice | list[int]) -> TaskBatch:
        """A sub-batch (rows of every tensor)."""
        idx = list(range(self.size))[rows] if isinstance(rows, slice) else list(rows)
        take = torch.tensor(idx, dtype=torch.long)
        return TaskBatch(
            clean=self.clean[take], corrupt=self.corrupt[take], answers=self.answers[take],
            wrong=self.wrong[take], answer_pos=self.answer_pos[take], indices=[self.indices[i] for i in idx],
            targets=None if self.targets is None else self.targets[take],
            extra={k: v[take] for k, v in self.extra.items()},
            reference_logprobs=None if self.reference_logprobs is None else self.reference_logprobs[take],
        )


@dataclass
class PreparedTask:
    """A task tokenized for one model: batches grouped by token length, and its metric."""

    task: Task
    model_spec: str
    batches: list[TaskBatch]
    str_tokens: list[list[str]]  # readable tokens of each clean prompt, by example index

    @property
    def metric_name(self) -> str:
        return self.task.metric

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> Float[torch.Tensor, " batch"]:
        return get_metric(self.task.metric)(logits, batch)

    @property
    def n_prompts(self) -> int:
        return sum(b.size for b in self.batches)

    def __iter__(self) -> Iterator[TaskBatch]:
        return iter(self.batches)

    def single_batch(self) -> TaskBatch:
        """The only batch; a clear error when prompts have several token lengths."""
        if len(self.batches) != 1:
            lengths = sorted({b.n_pos for b in self.batches})
            raise TokenizationError(
                f"this analysis needs prompts of one token length, but task {self.task.name!r} has lengths "
                f"{lengths} under {self.model_spec}; pass a task file (--task) whose prompts all have one token "
                "length, or --n 1 for a single prompt (from Python, PreparedTask.largest_group() keeps the "
                "largest group)"
            )
        return self.batches[0]

    def largest_group(self) -> PreparedTask:
        best = max(self.batches, key=lambda b: b.size)
        return replace(self, batches=[best])

    def with_reference(self, model: Model) -> PreparedTask:
        """Attach the clean run's answer-position log-probs to every batch (needed by the 'kl' metric)."""
        out = []
        with torch.no_grad():
            for b in self.batches:
                logits = model.bridge(b.clean, return_type="logits")
                final = logits[torch.arange(b.size), b.answer_pos]
                out.append(replace(b, reference_logprobs=torch.log_softmax(final, -1)))
        return replace(self, batches=out)

    @staticmethod
    def build(task: Task, model: Model) -> PreparedTask:
        check_output_width(task.metric, model.d_vocab_out, model.spec)
        rows = [_tokenize_example(task, model, i, ex) for i, ex in enumerate(task.examples)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((len(r["clean"]), len(r["corrupt"])), []).append(i)
        batches = [_make_batch([rows[i] for i in idx], idx) for _, idx in sorted(groups.items())]
        prepared = PreparedTask(task, model.spec, batches, [model.str_tokens(r["clean"]) for r in rows])
        if task.metric == "kl":
            prepared = prepared.with_reference(model)
        return prepared


def _tokenize_example(task: Task, model: Model, i: int, ex: Example) -> dict:
    where = f"example {i} of task {task.name!r}"
    # Token-level tasks (e.g. induction on random tokens) carry their ids; text would not round-trip.
    clean = list(ex.clean_ids) if ex.clean_ids is not None else model.encode(ex.clean)
    corrupt = list(ex.corrupt_ids) if ex.corrupt_ids is not None else model.encode(ex.corrupt)
    for label, ids in (("clean", clean), ("corrupt", corrupt)):
        if not ids:
            raise TaskError(f"{where}: the {label} prompt is empty; give it text or token ids")
        if len(ids) > model.n_ctx:
            raise TaskError(
                f"{where}: the {label} prompt is {len(ids)} tokens, longer than "
                f"{model.spec}'s context of {model.n_ctx}; shorten it"
            )
        _check_vocab(model, where, f"{label} prompt", ids)
    if task.align and len(clean) != len(corrupt):
        raise TokenizationError(
            f"{where}: clean and corrupt prompts must have the same token length "
            f"so positions align, but clean is {len(clean)} tokens {model.str_tokens(clean)} and corrupt is "
            f"{len(corrupt)} tokens {model.str_tokens(corrupt)}; pick a corruption with the same tokenization"
        )
    if not ex.answer and not ex.answer_ids and task.require_answers and needs_answers(task.metric):
        raise TaskError(f"{where} has no answer; give 'answer' (text) or 'answer_ids', or score a model whose "
                        "output is a number with the metric output:K")
    if ex.answer_ids or not ex.answer:  # ids as given, or no answer at all (output:K, kl and l2 score none)
        answers, wrong = list(ex.answer_ids or []), list(ex.wrong_ids or [])
    elif task.single_token_answers:
        answers = [model.single_token_id(a) for a in ex.answer]
        wrong = list(ex.wrong_ids) if ex.wrong_ids is not None else [model.single_token_id(w) for w in ex.wrong]
    else:  # first token of each answer string
        answers = [model.encode(a, bos=False)[0] for a in ex.answer]
        wrong = list(ex.wrong_ids) if ex.wrong_ids is not None else [model.encode(w, bos=False)[0] for w in ex.wrong]
    _check_vocab(model, where, "answer", answers, output=True)
    _check_vocab(model, where, "wrong answer", wrong, output=True)
    answer_pos = len(clean) - 1 if ex.answer_pos is None else ex.answer_pos
    if not -len(clean) <= answer_pos < len(clean):
        raise TaskError(f"{where}: answer_pos {answer_pos} is outside the clean prompt's {len(clean)} tokens")
    targets = ex.targets
    if targets is not None:
        if len(targets) != len(clean):
            raise TaskError(f"{where}: targets has {len(targets)} entries but the clean prompt has {len(clean)} "
                            "tokens; give one target id per position (-1 where not scored)")
        _check_vocab(model, where, "target", [t for t in targets if t != -1], output=True)
    return {
        "clean": clean, "corrupt": corrupt, "answers": answers, "wrong": wrong,
        "answer_pos": answer_pos % len(clean), "targets": targets, "extra": ex.extra,
    }


def _check_vocab(model: Model, where: str, label: str, ids: list[int], *, output: bool = False) -> None:
    """Prompt ids index the embedding (d_vocab wide); answer and target ids index the logits (d_vocab_out
    wide, often narrower in compiled models). One outside is a TaskError, not an index error mid-run."""
    width = model.d_vocab_out if output else model.d_vocab
    bad = [t for t in ids if not 0 <= t < width]
    if bad:
        what = "output vocabulary (the logits' width" if output else "vocabulary (the embedding's size"
        raise TaskError(
            f"{where}: {label} token id {bad[0]} is outside {model.spec}'s {what}: ids 0 to {width - 1}); "
            "token ids must come from this model's tokenizer"
        )


def _pad(lists: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def _make_batch(rows: list[dict], indices: list[int]) -> TaskBatch:
    targets = None
    if rows[0]["targets"] is not None:
        targets = torch.tensor([r["targets"] for r in rows], dtype=torch.long)
    extra = {k: torch.tensor([r["extra"][k] for r in rows]) for k in rows[0]["extra"]}
    return TaskBatch(
        clean=torch.tensor([r["clean"] for r in rows], dtype=torch.long),
        corrupt=torch.tensor([r["corrupt"] for r in rows], dtype=torch.long),
        answers=_pad([r["answers"] for r in rows]),
        wrong=_pad([r["wrong"] for r in rows]),
        answer_pos=torch.tensor([r["answer_pos"] for r in rows], dtype=torch.long),
        indices=indices, targets=targets, extra=extra,
    )
