"""LayerRestart (forward from block l on a cached residual) equals the bridge's full forward."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import PatchingError
from circuitlab.patching.restart import LayerRestart

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("fixture", ["toy", "toy_attn_only"])
def test_restart_equals_full_forward(request, fixture):
    model = request.getfixturevalue(fixture)
    tokens = torch.randint(3, model.d_vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    restart = LayerRestart(model)
    with torch.no_grad(), restart.capture():
        full, cache = model.bridge.run_with_cache(tokens)
    rows = torch.tensor([2, 0, 1, 1, 2])  # more rows than recorded: the mask/positions broadcast
    answer_pos = torch.tensor([6, 5, 4, 3, 0])
    # The restart runs the same modules on other batch shapes: float32 sums grouped differently differ by a
    # few eps of the logits per layer; 64 eps of the largest logit is far below an O(1) restart error.
    tol = 64 * EPS * max(1.0, float(full.abs().max()))
    with torch.no_grad():
        for layer in range(model.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_pre"][rows]
            assert (restart.run(layer, resid) - full[rows]).abs().max() <= tol
            assert (restart.run(layer, resid, answer_pos)[:, 0] - full[rows, answer_pos]).abs().max() <= tol
    assert (full[0] - full[1]).abs().max() > 1000 * tol  # the prompts' logits differ far beyond the tolerance


def test_restart_fires_bridge_hooks_from_the_start_layer_only(toy):
    tokens = torch.randint(3, toy.d_vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    restart = LayerRestart(toy)
    with torch.no_grad(), restart.capture():
        _, cache = toy.bridge.run_with_cache(tokens)
    fired = []
    hooks = [(f"blocks.{layer}.attn.hook_z", lambda t, hook: fired.append(hook.name)) for layer in range(toy.n_layers)]
    with torch.no_grad(), toy.bridge.hooks(fwd_hooks=hooks):
        restart.run(1, cache["blocks.1.hook_resid_pre"])
    assert fired == ["blocks.1.attn.o.hook_in"]  # the canonical name of the hook_z alias


def test_restart_needs_capture(toy):
    with pytest.raises(PatchingError, match="capture"):
        LayerRestart(toy).run(0, torch.zeros(1, 3, toy.d_model))
