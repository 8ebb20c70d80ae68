"""Built-in task generators on toy models: determinism, alignment, answer ids, metrics on crafted logits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from circuitlab.errors import MetricError, TaskError
from circuitlab.models.loading import load_native
from circuitlab.models.toy import BOS, PAD, UNK, toy_config
from circuitlab.tasks import builtin_tasks, make_task
from circuitlab.tasks import facts as facts_mod
from circuitlab.tasks import greater_than as gt_mod
from circuitlab.tasks import ioi as ioi_mod
from circuitlab.tasks import qa as qa_mod
from circuitlab.tasks.induction import induction_logprob
from circuitlab.tasks.task import TaskBatch

EPS32 = torch.finfo(torch.float32).eps


def _split_tokenizer(words: list[str]):
    """Word-level tokenizer that also splits punctuation and single digits (like SmolLM2 does digits)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([BOS, PAD, UNK, *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, pad_token=PAD, unk_token=UNK)


def _words(*texts: str) -> list[str]:
    return sorted({w for t in texts for w in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", t)})


def _toy(words: list[str], n_ctx: int = 96):
    tok = _split_tokenizer(words)
    return load_native(toy_config(n_layers=1, d_vocab=len(tok), n_ctx=n_ctx, seed=0), tokenizer=tok, name="toy-tasks")


@pytest.fixture(scope="module")
def task_toy():
    """A toy model whose vocabulary covers every built-in task's words."""
    texts = [*ioi_mod.TEMPLATES, *ioi_mod.NAMES, *ioi_mod.PLACES, *ioi_mod.OBJECTS, gt_mod.TEMPLATE, *gt_mod.NOUNS,
             "0123456789", qa_mod.DEMO, *(t.text for t in qa_mod.TEMPLATES),
             *(e for v in qa_mod.ENTITIES.values() for e in v), *(e.capitalize() for e in qa_mod.ENTITIES["COLOR"])]
    texts += [f.prompt + f.answer for f in facts_mod.FACTS]
    return _toy(_words(*texts))


def _records(task):
    return [(e.clean, e.corrupt, e.answer, e.wrong, dict(e.meta), e.clean_ids, e.targets, e.subject, e.extra)
            for e in task.examples]


def test_registry_lists_every_builtin():
    assert {"ioi", "induction", "facts", "greater-than", "qa"} <= set(builtin_tasks())


@pytest.mark.parametrize("name", ["ioi", "induction", "facts", "greater-than", "qa"])
def test_deterministic_given_seed_and_aligned(task_toy, name):
    a, b = make_task(name, task_toy, n=12, seed=3), make_task(name, task_toy, n=12, seed=3)
    assert _records(a) == _records(b)
    assert _records(a) != _records(make_task(name, task_toy, n=12, seed=4))
    prepared = a.prepare(task_toy)
    assert prepared.n_prompts == 12
    for batch in prepared:
        assert batch.clean.shape == batch.corrupt.shape
        assert (batch.clean[:, 0] == task_toy.bos_token_id).all()
        values = prepared.metric(task_toy.logits(batch.clean), batch)
        assert values.shape == (batch.size,) and torch.isfinite(values).all()


@pytest.mark.parametrize("name", ["ioi", "induction", "facts", "greater-than", "qa"])
def test_n_zero_raises(task_toy, name):
    with pytest.raises(TaskError, match="n must be >= 1"):
        make_task(name, task_toy, n=0)


# --- IOI ----------------------------------------------------------------------------------------------
def test_ioi_answers_and_corruptions(task_toy):
    task = make_task("ioi", task_toy, n=10, seed=0)
    batch = task.prepare(task_toy).batches[0]
    ex = task.examples[batch.indices[0]]
    assert batch.answers[0, 0] == task_toy.single_token_id(" " + ex.meta["io"])
    assert batch.wrong[0, 0] == task_toy.single_token_id(" " + ex.meta["s"])
    for e in task.examples:  # abc: neither clean name appears in the corrupt prompt
        words = re.findall(r"\w+", e.corrupt)
        assert e.meta["io"] not in words and e.meta["s"] not in words
        assert len(task_toy.encode(e.clean)) == len(task_toy.encode(e.corrupt))
    swap = make_task("ioi", task_toy, n=10, seed=0, corruption="swap")
    for e in swap.examples:  # the second S mention becomes the IO
        clean, corrupt = re.findall(r"\w+", e.clean), re.findall(r"\w+", e.corrupt)
        assert clean.count(e.meta["s"]) == 2 and corrupt.count(e.meta["io"]) == 2 and corrupt.count(e.meta["s"]) == 1
    with pytest.raises(TaskError, match="unknown IOI corruption"):
        make_task("ioi", task_toy, corruption="shuffle")
    with pytest.raises(TaskError, match="out of range"):
        make_task("ioi", task_toy, templates=[99])


def test_ioi_orders_alternate(task_toy):
    task = make_task("ioi", task_toy, n=len(ioi_mod.TEMPLATES) * 2, seed=0)
    for e in task.examples:
        first = e.clean.split(" and ")[0].split()[-1]
        assert first == (e.meta["io"] if e.meta["order"] == "ABBA" else e.meta["s"])
    assert {e.meta["order"] for e in task.examples} == {"ABBA", "BABA"}


# --- induction ----------------------------------------------------------------------------------------
def test_induction_structure(task_toy):
    task = make_task("induction", task_toy, n=4, seed=1, seq_len=5)
    batch = task.prepare(task_toy).single_batch()
    bos = task_toy.bos_token_id
    for row in range(batch.size):
        clean, corrupt, targets = batch.clean[row].tolist(), batch.corrupt[row].tolist(), batch.targets[row].tolist()
        first = clean[1:6]
        assert clean == [bos, *first, *first] and corrupt[:6] == clean[:6]
        assert not set(corrupt[6:]) & set(first) and len(set(first + corrupt[6:])) == 10
        assert targets == [-1] * 6 + first[1:] + first[:1]
        assert batch.answers[row, 0] == first[0]
    special = set(task_toy.tokenizer.all_special_ids)
    assert not set(batch.clean[:, 1:].flatten().tolist()) & special


def test_induction_metric_on_crafted_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[-1, -1, 3, 0, 6], [-1, 2, -1, -1, 5]])
    batch = TaskBatch(clean=torch.zeros(2, 5, dtype=torch.long), corrupt=torch.zeros(2, 5, dtype=torch.long),
                      answers=torch.zeros(2, 1, dtype=torch.long), wrong=-torch.ones(2, 1, dtype=torch.long),
                      answer_pos=torch.tensor([4, 4]), indices=[0, 1], targets=targets)

    def logprob(b: int, p: int, t: int) -> float:  # hand log-softmax
        row = logits[b, p].tolist()
        return row[t] - math.log(sum(math.exp(v) for v in row))

    want = [(logprob(0, 2, 3) + logprob(0, 3, 0) + logprob(0, 4, 6)) / 3, (logprob(1, 1, 2) + logprob(1, 4, 5)) / 2]
    # log-softmax in float32 vs exact: a few ops, each off by eps32 relative to |logit| + log(vocab)
    # (measured 2.3 eps32 here); 16 such roundings bound it.
    tol = 16 * EPS32 * (float(logits.abs().max()) + math.log(logits.shape[-1]))
    torch.testing.assert_close(induction_logprob(logits, batch), torch.tensor(want), atol=tol, rtol=0)
    with pytest.raises(MetricError, match="targets"):
        induction_logprob(logits, TaskBatch(**{**batch.__dict__, "targets": None}))


def test_induction_bad_options(task_toy):
    with pytest.raises(TaskError, match="seq_len"):
        make_task("induction", task_toy, seq_len=1)
    with pytest.raises(TaskError, match="distinct"):
        make_task("induction", task_toy, seq_len=10, pool_size=12)
    with pytest.raises(TaskError, match="context"):
        make_task("induction", task_toy, seq_len=100)


# --- facts --------------------------------------------------------------------------------------------
def test_facts_subject_span_and_partner(task_toy):
    task = make_task("facts", task_toy, n=10, seed=0)
    for ex in task.examples:
        ids = task_toy.encode(ex.clean)
        span = task_toy.decode(ids[ex.extra["subject_start"]: ex.extra["subject_end"]])
        assert span.strip() == ex.subject
        assert set(ex.extra) == {"subject_start", "subject_end"}
        assert set(ex.meta) == {"relation", "corrupt_subject"}  # free-form fields only
        assert ex.corrupt == ex.meta["relation"].format(ex.meta["corrupt_subject"])
        assert ex.answer != ex.wrong and len(task_toy.encode(ex.corrupt)) == len(ids)
    prepared = task.prepare(task_toy)
    assert all("subject_start" in b.extra for b in prepared)


def test_facts_custom_list_and_errors(task_toy):
    custom = [("The capital of {} is", "France", " Paris"), ("The capital of {} is", "Italy", " Rome")]
    task = make_task("facts", task_toy, facts=custom)
    assert sorted(e.clean for e in task.examples) == ["The capital of France is", "The capital of Italy is"]
    assert {(e.answer[0], e.wrong[0]) for e in task.examples} == {(" Paris", " Rome"), (" Rome", " Paris")}
    assert task.examples[0].extra["subject_start"] == 4  # BOS The capital of | France
    with pytest.raises(TaskError, match="n <= 2"):
        make_task("facts", task_toy, facts=custom, n=3)
    with pytest.raises(TaskError, match="corrupt partner"):
        make_task("facts", task_toy, facts=custom[:1])
    with pytest.raises(TaskError, match="exactly one"):
        make_task("facts", task_toy, facts=[("The capital of France is", "France", " Paris")])


def test_facts_check_filters_with_the_model(task_toy):
    # A random toy model gets (almost) no fact right, so run-time checking leaves no usable pair.
    with pytest.raises(TaskError, match="corrupt partner"):
        make_task("facts", task_toy, check=True)


# --- greater-than -------------------------------------------------------------------------------------
def test_greater_than_prompts(task_toy):
    task = make_task("greater-than", task_toy, n=16, seed=0)
    batch = task.prepare(task_toy).single_batch()
    digits = gt_mod.digit_ids(task_toy)
    for row, i in enumerate(batch.indices):
        ex = task.examples[i]
        yy = int(batch.extra["yy"][row])
        assert 11 <= yy <= 88 and yy % 10 not in (0, 9) and yy // 10 != 9
        assert ex.clean.endswith(f"{ex.meta['start'] // 100}{yy // 10}") and ex.meta["start"] % 100 == yy
        assert ex.corrupt.endswith(f"{ex.meta['start'] // 100}01 to the year {ex.meta['start'] // 100}0")
        assert batch.clean[row, -1] == digits[yy // 10] and batch.answer_pos[row] == batch.n_pos - 1
        assert sorted(batch.answers[row][batch.answers[row] >= 0].tolist()) == [digits[u] for u in range(yy % 10 + 1, 10)]
        assert sorted(batch.wrong[row][batch.wrong[row] >= 0].tolist()) == [digits[u] for u in range(yy % 10)]


def _gt_batch(yy: list[int], vocab: int, digits: list[int]) -> TaskBatch:
    b = len(yy)
    return TaskBatch(clean=torch.zeros(b, 4, dtype=torch.long), corrupt=torch.zeros(b, 4, dtype=torch.long),
                     answers=torch.zeros(b, 1, dtype=torch.long), wrong=torch.zeros(b, 1, dtype=torch.long),
                     answer_pos=torch.full((b,), 3), indices=list(range(b)),
                     extra={"yy": torch.tensor(yy), "digit_ids": torch.tensor([digits] * b)})


def test_greater_than_metric_hand_computation():
    vocab, digits = 20, list(range(5, 15))  # digit d is token 5 + d; other tokens must not matter
    p_tens = [0.05, 0.05, 0.1, 0.2, 0.3, 0.1, 0.1, 0.05, 0.03, 0.02]
    p_units = [0.1] * 10
    logits = torch.randn(1, 4, vocab) * 5  # random non-digit logits: renormalised over digits away
    logits[0, 2, 5:15] = torch.tensor(p_tens).log()
    logits[0, 3, 5:15] = torch.tensor(p_units).log() + 3.0  # a constant shift changes nothing
    logits.requires_grad_(True)
    # yy = 32: later = (0.3+0.1+0.1+0.05+0.03+0.02) + 0.2 * 0.7 = 0.74; earlier = 0.2 + 0.2 * 0.2 = 0.24
    value = gt_mod.greater_than_prob_diff(logits, _gt_batch([32], vocab, digits))
    # sums of <= 20 float32 softmax probabilities in [0, 1], each off by a few eps32: 32 eps32 bounds it
    torch.testing.assert_close(value, torch.tensor([0.5]), atol=32 * EPS32, rtol=0)
    value.sum().backward()
    assert logits.grad is not None and logits.grad[0, 2, 5:15].abs().sum() > 0


def test_greater_than_metric_batched_extremes():
    vocab, digits = 12, list(range(10))
    logits = torch.full((3, 4, vocab), -30.0)
    logits[0, 2, 9] = logits[0, 3, 0] = 30.0  # tens 9 > 4: certainly later
    logits[1, 2, 4] = logits[1, 3, 2] = 30.0  # tens 4 = t, units 2 < 5: certainly earlier
    logits[2, 2, 4] = logits[2, 3, 5] = 30.0  # exactly the start year: neither
    value = gt_mod.greater_than_prob_diff(logits, _gt_batch([45, 45, 45], vocab, digits))
    # the -30 logits carry e^-60 of the mass (below float32 resolution at 1); the rest is float32 rounding
    # of probabilities near 1, a few eps32
    torch.testing.assert_close(value, torch.tensor([1.0, -1.0, 0.0]), atol=8 * EPS32, rtol=0)
    with pytest.raises(MetricError, match="greater-than"):
        gt_mod.greater_than_prob_diff(logits, TaskBatch(**{**_gt_batch([45] * 3, vocab, digits).__dict__, "extra": {}}))


def test_greater_than_needs_digit_splitting(toy):
    # The conftest toy tokenizer keeps "1732" as one (unknown) word: a clear error, not a wrong task.
    with pytest.raises(TaskError, match="single digits"):
        make_task("greater-than", toy, n=2)


# --- qa -----------------------------------------------------------------------------------------------
def test_qa_corrupt_replaces_only_the_answer(task_toy):
    task = make_task("qa", task_toy, n=8, seed=2)
    for ex in task.examples:
        clean, corrupt = ex.clean.split(), ex.corrupt.split()
        diff = [(a, b) for a, b in zip(clean, corrupt, strict=True) if a != b]
        assert len(diff) == 1
        answer, replacement = (w.strip(".") for w in diff[0])
        assert ex.answer[0] == " " + answer and ex.wrong[0] == " " + replacement
        assert ex.clean.startswith(qa_mod.DEMO)
    color = make_task("qa", task_toy, n=1, templates=[2]).examples[0]
    assert color.answer == [color.answer[0], color.answer[0].title()]  # " green" and " Green"
    with pytest.raises(TaskError, match="out of range"):
        make_task("qa", task_toy, templates=[7])
