"""A two-prompt IOI-like task in the toy vocabulary (tests/conftest.py), shared by the discovery tests."""

from __future__ import annotations

import pytest

from circuitlab.tasks.task import Example, Task

ROWS = [
    ("When Mary and John went to the store , John gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " Mary", " John"),
    ("When John and Mary went to the store , Mary gave a drink to",
     "When Tom and Anna went to the store , Paul gave a drink to", " John", " Mary"),
]


@pytest.fixture(scope="module")
def names_task():
    return Task("names", [Example(clean, corrupt, [answer], [wrong]) for clean, corrupt, answer, wrong in ROWS])
