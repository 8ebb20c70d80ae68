"""Lenses (docs/METHODS.md, "Logit lens"): read intermediate residual streams in vocabulary space.

The registered analysis is ``lens`` (`circuitlab.lens.analysis`); plumbing (hook names, the figure) stays
in the submodules.
"""

from circuitlab.lens.logit_lens import LensResult, lens_from_resid, logit_lens

__all__ = ["logit_lens", "lens_from_resid", "LensResult"]
