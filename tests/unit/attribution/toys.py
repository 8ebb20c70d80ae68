"""Shared by the attribution unit tests: a toy IOI-like task, float64 toys, and the float32 rounding bound.

Tolerances. Two float32 computations of one quantity that differ only in the order of their additions
(a sliced vs a full unembedding, an einsum vs the model's own linear layer, a sum of components vs the
forward) differ by a few units of eps32 * S, where S is the sum of the magnitudes of the terms added (the
condition of the sum). Measured on these toys: at most 2 units. `ROUNDING` = 16 units leaves 8x room on
any machine and still fails on a real bug (an error of 1e-3 is ~10^4 units). Finite differences run on a
float64 copy of the toy (`toy64`), where rounding is ~1e-16 and only the truncation error O(h^2) is left.
"""

from __future__ import annotations

import torch

from circuitlab.models.model import Model
from circuitlab.models.toy import toy_model
from circuitlab.tasks import Example, PreparedTask, Task

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
ROUNDING = 16

WORDS = (
    "Mary John Tom Anna Paul Kate When and went to the store , gave a drink . Then Paris France is in "
    "capital of city The 1 2 3 4 5 6 7 8 9 0 year from"
).split()

EXAMPLES = [
    Example("When Mary and John went to the store , John gave a drink to",
            "When Tom and Anna went to the store , Kate gave a drink to", [" Mary"], [" John"]),
    Example("When Tom and Paul went to the store , Paul gave a drink to",
            "When Mary and Anna went to the store , Kate gave a drink to", [" Tom"], [" Paul"]),
    Example("When Kate and Anna went to the store , Anna gave a drink to",
            "When John and Paul went to the store , Mary gave a drink to", [" Kate"], [" Anna"]),
]
# Two prompts one token shorter: with EXAMPLES, a task of two token lengths.
SHORT = [
    Example("Then Mary and John went to the store , John gave to",
            "Then Tom and Anna went to the store , Kate gave to", [" Mary"], [" John"]),
    Example("Then Anna and Paul went to the store , Paul gave to",
            "Then Mary and Kate went to the store , John gave to", [" Anna"], [" Paul"]),
]


def prepared(model: Model, examples: list[Example] = EXAMPLES, metric: str = "logit_diff") -> PreparedTask:
    return Task("toy-ioi", examples, metric=metric).prepare(model)


def rounding_bound(scale: torch.Tensor | float) -> float:
    """`ROUNDING` units of float32 rounding of a sum whose terms have magnitudes summing to `scale`."""
    return ROUNDING * EPS32 * float(scale)


def toy64(**config) -> Model:
    """A toy model in float64 without norms: finite differences there see only their truncation error.

    Without norms because the bridge's norms round through float32 whatever the model's dtype (measured:
    with RMSNorm, m(h) + m(-h) - 2 m(0) is ~1e-7 at h = 1e-6 instead of ~1e-16), which would bring float32
    rounding back into the difference quotient.
    """
    config.setdefault("normalization_type", None)
    model = toy_model(words=WORDS, **config)
    model.bridge.to(torch.float64)
    model.bridge.eval()
    return model
