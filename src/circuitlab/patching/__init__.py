"""Activation patching: sweeps over sites x layers x positions x heads, fast, with heatmaps."""

from circuitlab.patching.grid import GRANULARITIES, Cell, parse_by
from circuitlab.patching.patcher import ActivationPatcher
from circuitlab.patching.result import PatchingResult
from circuitlab.patching.sites import SITES, PatchingError, Site, get_site

__all__ = [
    "ActivationPatcher", "PatchingResult", "PatchingError", "Cell", "Site", "SITES", "GRANULARITIES",
    "get_site", "parse_by",
]
