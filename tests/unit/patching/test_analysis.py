"""The `patch` analysis entry: options validated without a model, IOI kept to one template for positions."""

from __future__ import annotations

import pytest

from circuitlab.errors import PatchingError
from circuitlab.patching.analysis import PATCH, PatchParams
from circuitlab.runner import get_analysis, run
from circuitlab.tasks.source import TaskSource


def test_registered():
    assert get_analysis("patch") is PATCH and PATCH.task == "required"


def test_params_are_canonical():
    params = PatchParams(site="z", by="head, layer", direction="noising", layers=[3, 1])
    assert (params.by, params.direction, params.layers) == ("layer,head", "noise", (3, 1))
    assert params.axes == ("layer", "head")


@pytest.mark.parametrize("options, message", [
    ({"site": "resid_middle"}, r"unknown patching site 'resid_middle'; choose one of resid_pre, .*pattern"),
    ({"site": "embed"}, "unknown patching site"),  # in the hook table, but not patchable
    ({"by": "pos"}, r"unsupported granularity 'pos'; choose one of: layer,pos, layer, layer,head, layer,head,pos"),
    ({"site": "resid_pre", "by": "layer,head"}, "has no heads"),
    ({"direction": "sideways"}, "unknown direction 'sideways'; use 'denoise'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_batch": 2.5}, "max_batch must be an integer >= 1"),
    ({"layers": [-1]}, "layers must be"),
    ({"layers": []}, "layers must be"),
])
def test_bad_options_fail_before_the_model_loads(no_model_load, options, message):
    with pytest.raises(PatchingError, match=message):
        run("patch", model="smollm2-135m", task="ioi", **options)


@pytest.mark.parametrize("by, options, templates", [
    ("layer,pos", {}, [0]),  # positions must align: one template
    ("layer,head,pos", {}, [0]),
    ("layer,pos", {"templates": [1, 2]}, [1, 2]),  # an explicit choice is kept
    ("layer,head", {}, None),  # no positions: every template
])
def test_ioi_keeps_one_template_for_position_sweeps(by, options, templates):
    source = TaskSource(name="ioi", n=4, options=options)
    assert PATCH.task_source is not None
    adjusted = PATCH.task_source(source, PatchParams(site="z", by=by))
    assert adjusted.options.get("templates") == templates


def test_other_tasks_are_left_alone():
    source = TaskSource(name="greater-than", n=4)
    assert PATCH.task_source is not None
    assert PATCH.task_source(source, PatchParams()) == source


def test_attention_only_model_refuses_mlp_sites_and_writes_nothing(tmp_path, toy_attn_only, task_file):
    with pytest.raises(PatchingError, match="attention-only"):
        run("patch", model=toy_attn_only, task=str(task_file), site="mlp_out", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
