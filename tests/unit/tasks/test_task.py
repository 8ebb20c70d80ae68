"""Task validation, grouping, metrics, task files and results: toy model, crafted logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuitlab.errors import MetricError, TaskError, TokenizationError
from circuitlab.results import Result, load_results
from circuitlab.tasks import Example, Task, evaluate_task, get_metric, make_task, normalised
from circuitlab.tasks.files import load_task_file
from circuitlab.tasks.task import TaskBatch

EPS32 = torch.finfo(torch.float32).eps


def _batch(answers, wrong, n_pos=3, vocab=5):
    b = len(answers)
    return TaskBatch(
        clean=torch.zeros(b, n_pos, dtype=torch.long), corrupt=torch.zeros(b, n_pos, dtype=torch.long),
        answers=torch.tensor(answers), wrong=torch.tensor(wrong),
        answer_pos=torch.full((b,), n_pos - 1), indices=list(range(b)),
    )


def test_logit_diff_uses_answer_position_and_answer_sets():
    logits = torch.zeros(2, 3, 5)
    logits[0, 2] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    logits[1, 2] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    logits[:, 1] = 100.0  # a non-answer position must be ignored
    batch = _batch([[4, -1], [0, 1]], [[0, -1], [4, -1]])
    out = get_metric("logit_diff")(logits, batch)
    assert torch.equal(out, torch.tensor([5.0 - 1.0, 4.5 - 1.0]))  # means of small integers: exact in float32


def test_prob_and_logprob_sum_over_answer_set():
    logits = torch.zeros(1, 1, 4)
    batch = _batch([[0, 1]], [[2]], n_pos=1, vocab=4)
    # log-softmax of equal logits is -log 4, then logsumexp of two: a few float32 roundings of values ~1
    tol = 4 * EPS32
    torch.testing.assert_close(get_metric("prob")(logits, batch), torch.tensor([0.5]), atol=tol, rtol=0)
    torch.testing.assert_close(get_metric("logprob")(logits, batch), torch.tensor([math.log(0.5)]), atol=tol, rtol=0)


def test_kl_is_zero_against_itself_and_needs_reference():
    logits = torch.randn(2, 3, 5)
    batch = _batch([[1], [2]], [[0], [0]])
    with pytest.raises(MetricError, match="with_reference"):
        get_metric("kl")(logits, batch)
    batch.reference_logprobs = torch.log_softmax(logits[:, -1], -1)
    assert torch.equal(get_metric("kl")(logits, batch), torch.zeros(2))  # the same log-softmax twice: bit-identical
    assert (get_metric("kl")(torch.randn(2, 3, 5), batch) > 0).all()


def test_metrics_are_differentiable():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    get_metric("logit_diff")(logits, _batch([[1], [2]], [[0], [3]])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_normalised_metric_and_zero_denominator():
    assert float(normalised(1.5, 2.0, 1.0)) == 0.5  # 0.5 / 1.0: exact in binary
    with pytest.raises(MetricError, match="clean .* and corrupt .* metrics are equal"):
        normalised(1.0, 2.0, 2.0)


def test_unknown_metric_and_empty_task():
    ex = Example("Mary", "John", " Mary", " John")
    with pytest.raises(MetricError, match="unknown metric 'bogus'"):
        Task("t", [ex], metric="bogus")
    with pytest.raises(TaskError, match="no examples"):
        Task("t", [])


def test_prepare_groups_by_length_and_validates(toy):
    exs = [
        Example("When Mary and John went to the store , John gave a drink to", "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
        Example("Then Mary gave a drink to", "Then Tom gave a drink to", " John", " Mary"),
        Example("When John and Mary went to the store , Mary gave a drink to", "When Tom and Anna went to the store , Paul gave a drink to", " John", " Mary"),
    ]
    prepared = Task("t", exs).prepare(toy)
    assert sorted(b.size for b in prepared.batches) == [1, 2]
    assert prepared.n_prompts == 3
    with pytest.raises(TokenizationError, match="one token length"):
        prepared.single_batch()
    assert prepared.largest_group().single_batch().size == 2
    ev = evaluate_task(toy, prepared)
    assert ev.clean.shape == (3,) and torch.isfinite(ev.clean).all()


def test_misaligned_clean_corrupt_error_shows_tokenizations(toy):
    task = Task("t", [Example("Mary gave a drink to", "Mary gave to", " John", " Mary")])
    with pytest.raises(TokenizationError, match=r"clean is 6 tokens .* corrupt is 4 tokens"):
        task.prepare(toy)
    assert Task("t", task.examples, align=False).prepare(toy).n_prompts == 1


def test_multi_token_answer_error(toy):
    task = Task("t", [Example("Mary gave a drink to", "John gave a drink to", " John Mary", " Mary")])
    with pytest.raises(TokenizationError, match="2 tokens"):
        task.prepare(toy)


def test_prompt_longer_than_context(toy):
    long = " ".join(["Mary"] * (toy.n_ctx + 2))
    with pytest.raises(TaskError, match="longer than"):
        Task("t", [Example(long, long, " Mary", " John")]).prepare(toy)


def test_task_files_jsonl_and_csv(tmp_path, toy):
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"clean": "Mary gave a drink to", "corrupt": "Tom gave a drink to", "answer": " John", "wrong": [" Mary"], "subject": "Mary"}\n')
    task = load_task_file(jl)
    assert task.metric == "logit_diff" and task.examples[0].wrong == [" Mary"]
    assert task.examples[0].subject == "Mary" and task.examples[0].meta == {}  # a typed field, not meta
    csv = tmp_path / "t.csv"
    csv.write_text("clean,corrupt,answer\nMary gave a drink to,Tom gave a drink to, John| Paul\n")
    task = make_task(str(csv), toy)
    assert task.metric == "logprob" and task.examples[0].answer == [" John", " Paul"]
    assert task.prepare(toy).batches[0].answers.shape == (1, 2)


@pytest.mark.parametrize(
    "content, suffix, message",
    [("", ".jsonl", "holds no examples"), ('{"clean": "a"}\n', ".jsonl", "lacks field"),
     ("{bad json\n", ".jsonl", "not valid JSON"), ("x", ".txt", "must end in")],
)
def test_bad_task_files(tmp_path, content, suffix, message):
    path = tmp_path / f"t{suffix}"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_task_file(path)


def test_unknown_task_name(toy):
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        make_task("nope", toy)


def test_result_round_trip_and_atomic_save(tmp_path):
    res = Result("eval", {"spec": "toy"}, {"name": "t"}, {"a": 1}, [{"layer": 0, "value": 0.5}], seed=3, timing_s=1.0)
    nan = Result("eval", {}, None, {}, [{"value": float("nan")}])
    assert Result.from_json(nan.to_json()).records == [{"value": None}]  # strict JSON: NaN -> null
    path = res.save(tmp_path)
    back = load_results(tmp_path)
    assert back == Result.from_json(path.read_text())
    assert back.records == res.records and back.versions["torch"] != "not installed"
    assert list(back.to_frame().columns) == ["layer", "value"]
    assert (tmp_path / "results.csv").read_text().startswith("layer,value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]


def test_id_rows_need_no_text_and_are_used_as_given(tmp_path, toy):
    mary, john, gave = (toy.single_token_id(w) for w in (" Mary", " John", " gave"))
    jl = tmp_path / "ids.jsonl"
    jl.write_text(json.dumps({"clean_ids": [mary, gave, john], "corrupt_ids": [john, gave, mary],
                              "answer_ids": [mary], "wrong_ids": [john], "answer_pos": -2, "note": "x"}) + "\n")
    task = load_task_file(jl)
    ex = task.examples[0]
    assert task.metric == "logit_diff" and ex.clean == "" and ex.meta == {"note": "x"}
    batch = task.prepare(toy).single_batch()
    assert batch.clean.tolist() == [[mary, gave, john]]  # no BOS added to given ids
    assert batch.answers.tolist() == [[mary]] and batch.wrong.tolist() == [[john]]
    assert batch.answer_pos.tolist() == [1]  # -2 counts from the end
    csv = tmp_path / "ids.csv"
    csv.write_text(f"clean_ids,corrupt,answer,targets\n{mary}|{gave},Mary, John,-1|{john}\n")  # BOS + Mary
    batch = load_task_file(csv).prepare(toy).batches[0]
    assert batch.clean.tolist() == [[mary, gave]] and batch.targets.tolist() == [[-1, john]]


def test_targets_must_cover_the_clean_prompt(toy):
    ex = Example("Mary gave", "John gave", " John", targets=[-1])
    with pytest.raises(TaskError, match="targets has 1 entries but the clean prompt has 3 tokens"):
        Task("t", [ex], align=False).prepare(toy)


def test_structural_keys_given_in_meta_move_to_their_fields():
    ex = Example("a", "b", " c", meta={"subject": "a", "extra": {"k": 1}, "note": 2})
    assert ex.subject == "a" and ex.extra == {"k": 1} and ex.meta == {"note": 2}
    with pytest.raises(TaskError, match="'subject' must be a string"):
        Example("a", "b", " c", subject=3)  # type: ignore[arg-type]


def test_answers_optional_when_the_task_says_so(tmp_path, toy):
    """A file without answers loads (and prepares) only with require_answers=False; by default the missing
    field is named. `has_answers` tells the scorers which metrics the task can feed."""
    path = tmp_path / "no_answers.jsonl"
    rows = [{"clean": "When Mary and John went to the store", "corrupt": "When Tom and Anna went to the store"},
            {"clean_ids": [3, 4, 5], "corrupt_ids": [3, 6, 5]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskError, match=r"lacks field\(s\) \['answer'\]"):
        load_task_file(path)
    task = load_task_file(path, require_answers=False)
    assert not task.require_answers and not task.has_answers and task.metric == "logprob"
    prepared = task.prepare(toy)
    assert prepared.n_prompts == 2 and all(bool((b.answers == -1).all()) for b in prepared.batches)
    strict = Task("strict", task.examples)
    with pytest.raises(TaskError, match="has no answer"):
        strict.prepare(toy)
    assert Task("ok", [Example("a", "b", ["c"])]).has_answers
