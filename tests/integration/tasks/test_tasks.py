"""Built-in tasks on the real SmolLM2: clean behaviour clearly beats corrupt behaviour on each."""

from __future__ import annotations

from circuitlab.tasks import evaluate_task, make_task
from circuitlab.tasks.facts import FACTS


def _evaluate(model, name, **kwargs):
    task = make_task(name, model, **kwargs)
    return task, evaluate_task(model, task.prepare(model))


def test_ioi_default_prompts_are_solved(smollm):
    _, ev = _evaluate(smollm, "ioi", n=64, seed=0)
    assert ev.accuracy >= 0.95
    assert ev.clean_mean >= 3.0
    assert ev.corrupt_mean < 1.0  # abc names carry no IO information


def test_induction_second_copy_is_predicted(smollm):
    _, ev = _evaluate(smollm, "induction", n=8, seed=0)
    assert ev.clean_mean > -7.0
    assert ev.clean_mean - ev.corrupt_mean > 3.0  # nats per token


def test_greater_than_prefers_later_years(smollm):
    _, ev = _evaluate(smollm, "greater-than", n=16, seed=0)
    assert ev.clean_mean > 0.6
    assert ev.corrupt_mean < 0.0
    assert ev.accuracy >= 0.8


def test_facts_default_list_is_answered_top1(smollm):
    task, ev = _evaluate(smollm, "facts", n=12, seed=0)
    assert len(task) == 12 and ev.accuracy == 1.0
    assert ev.clean_mean > 3.0 and ev.corrupt_mean < -3.0
    # Run-time checking keeps every fact: the module's list was filtered with this model.
    all_checked = make_task("facts", smollm, check=True)
    assert len(all_checked) == len(make_task("facts", smollm)) >= 40
    assert len(FACTS) >= 40


def test_qa_copies_the_answer_from_the_document(smollm):
    _, ev = _evaluate(smollm, "qa", n=8, seed=0)
    assert ev.clean_mean > 2.0
    assert ev.corrupt_mean < 0.0
    assert ev.accuracy >= 0.6
