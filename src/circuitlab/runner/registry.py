"""The table of every analysis circuitlab can run: name -> where its `Analysis` entry lives.

Entries are imported on first use, so listing names or parsing a command line does not import torch.
To add an analysis: write its ``Analysis`` object in its package's ``analysis.py`` and add one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from circuitlab.analysis import Analysis
from circuitlab.errors import AnalysisError

_TABLE: dict[str, str] = {
    "eval": "circuitlab.runner.evaluation:EVAL",
    "attribute/dla": "circuitlab.attribution.analysis:DLA",
    "attribute/ig": "circuitlab.attribution.analysis:IG",
    "attribute/rollout": "circuitlab.attribution.analysis:ROLLOUT",
    "attribute/flow": "circuitlab.attribution.analysis:FLOW",
    "attribute/attn-grad": "circuitlab.attribution.analysis:ATTN_GRAD",
    "attribute/atp": "circuitlab.attribution.analysis:ATP",
    "lens": "circuitlab.lens.analysis:LENS",
    "patch": "circuitlab.patching.analysis:PATCH",
    "trace": "circuitlab.patching.trace_analysis:TRACE",
    "trace/average": "circuitlab.patching.trace_analysis:TRACE_AVERAGE",
    "path-patch": "circuitlab.graph.analysis:PATH_PATCH",
    "discover/eap": "circuitlab.discovery.analysis:EAP",
    "discover/eap-ig": "circuitlab.discovery.analysis:EAP_IG",
    "discover/eap-ig-act": "circuitlab.discovery.analysis:EAP_IG_ACT",
    "discover/exact": "circuitlab.discovery.analysis:EXACT",
    "discover/acdc": "circuitlab.discovery.acdc_analysis:ACDC",
    "discover/prune": "circuitlab.discovery.prune:PRUNE",
    "discover/grow": "circuitlab.discovery.grow:GROW",
    "verify": "circuitlab.verify.analysis:VERIFY",
    "discover/grad": "circuitlab.discovery.analysis:GRAD",
    "discover/heads": "circuitlab.discovery.analysis:HEADS",
    "heads": "circuitlab.heads.analysis:HEADS",
    "study/ioi": "circuitlab.studies.ioi:IOI",
    "study/induction": "circuitlab.studies.induction:INDUCTION",
    "study/qa": "circuitlab.studies.qa:QA",
}


def analysis_names() -> list[str]:
    return list(_TABLE)


def sharded_names() -> list[str]:
    """The analyses that run over prompt shards (``--backend ray``, ``--resume``); imports every entry."""
    return [name for name in _TABLE if getattr(get_analysis(name), "shard", None) is not None]


def get_analysis(name: str) -> Analysis[Any]:
    """The registered analysis called `name`; an `AnalysisError` listing the names otherwise."""
    if name not in _TABLE:
        raise AnalysisError(f"unknown analysis {name!r}; choose one of {', '.join(_TABLE)}")
    module, attr = _TABLE[name].split(":")
    entry = getattr(importlib.import_module(module), attr)
    if not isinstance(entry, Analysis):
        raise TypeError(f"{_TABLE[name]} is not an Analysis")
    return entry
