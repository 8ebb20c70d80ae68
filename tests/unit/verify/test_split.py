"""Task splits for generalisation: halves by index, held-out templates, clear errors for empty splits."""

from __future__ import annotations

import pytest

from circuitlab.errors import VerifyError
from circuitlab.tasks.task import Example, Task
from circuitlab.verify.split import check_split, split_task


def task(n: int, templates: list[int] | None = None) -> Task:
    return Task("t", [Example(f"clean {i}", f"corrupt {i}", [" a"], meta={} if templates is None else
                              {"template": templates[i]}) for i in range(n)])


def test_train_and_test_are_the_two_halves():
    train, other = split_task(task(5), "train")
    assert [e.clean for e in train.examples] == ["clean 0", "clean 1", "clean 2"]
    assert other is not None and [e.clean for e in other.examples] == ["clean 3", "clean 4"]
    assert train.params["split"] == "train" and other.params["split"] == "test"
    test, rest = split_task(task(5), "test")
    assert len(test) == 2 and rest is not None and len(rest) == 3
    whole, none = split_task(task(5), None)
    assert len(whole) == 5 and none is None


def test_template_split_holds_out_templates():
    inside, other = split_task(task(6, [0, 1, 2, 0, 1, 2]), "template:0,2")
    assert [e.clean for e in inside.examples] == ["clean 0", "clean 2", "clean 3", "clean 5"]
    assert other is not None and len(other) == 2 and other.params["split"] == "other templates"


def test_empty_splits_are_clear_errors():
    with pytest.raises(VerifyError, match="split 'test' is empty"):
        split_task(task(1), "test")
    with pytest.raises(VerifyError, match=r"is empty: task 't' has templates \[0, 1\]"):
        split_task(task(4, [0, 1, 0, 1]), "template:3")
    with pytest.raises(VerifyError, match="record no template"):
        split_task(task(4), "template:0")


def test_unknown_splits_fail_without_a_task():
    for bad in ("validation", "template:", "template:x", "template:-1"):
        with pytest.raises(VerifyError):
            check_split(bad)
    assert check_split("template:1, 2") == "template:1, 2"
