"""Lenses: read intermediate residual streams in vocabulary space."""

from circuitlab.lens.logit_lens import (
    LensError,
    LensResult,
    lens_from_resid,
    lens_sites,
    logit_lens,
    plot_lens,
)

__all__ = ["LensError", "LensResult", "lens_from_resid", "lens_sites", "logit_lens", "plot_lens"]
