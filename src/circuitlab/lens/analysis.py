"""The logit lens as a registered analysis (``lens``): one prompt, no task."""

from __future__ import annotations

from dataclasses import dataclass

from circuitlab.analysis import Analysis
from circuitlab.errors import LensError
from circuitlab.lens.logit_lens import LensResult, logit_lens
from circuitlab.models.model import Model
from circuitlab.tasks.task import Task


@dataclass(frozen=True)
class LensParams:
    """prompt: the text read layer by layer; target: a token followed through depth (its rank and
    probability); top_k: tokens kept per depth and position."""

    prompt: str
    target: str | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise LensError("the prompt is empty; pass some text to read, e.g. --prompt 'The Eiffel Tower is in'")
        if self.target is not None and (not isinstance(self.target, str) or not self.target):
            raise LensError("the target is empty; pass one token, e.g. --target ' Paris', or leave it out")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise LensError(f"top_k must be an integer >= 1, got {self.top_k!r}")


def _lens(model: Model, task: Task | None, params: LensParams) -> LensResult:
    return logit_lens(model, params.prompt, target=params.target, top_k=params.top_k)


LENS = Analysis("lens", "logit lens: every layer's residual stream read through the final norm and unembedding",
                LensParams, _lens, task="none")
