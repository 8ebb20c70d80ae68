"""On SmolLM2-135M: the logits fast path and the restart equal the masked-edge run (a few senders)."""

from __future__ import annotations

import torch

from circuitlab.graph.direct_paths import direct_logit_sweep, masked_sweep
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.graph.path_patching import resolve_receivers
from circuitlab.graph.restart import restart_sweep

EPS = torch.finfo(torch.float32).eps


def test_fast_paths_equal_the_masked_run(smollm):
    engine = MaskedEdgeEngine(smollm)
    clean = smollm.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    corrupt = smollm.to_tokens(["When Tom and Anna went to the store, Paul gave a drink to"])
    a, b = smollm.single_token_id(" Mary"), smollm.single_token_id(" John")

    def metric(logits):
        return logits[:, -1, a] - logits[:, -1, b]

    def readout(logits):  # logits at the last position, columns (a, b)
        return logits[:, 0, 0] - logits[:, 0, 1]

    positions, columns = torch.full((1, 1), clean.shape[1] - 1), torch.tensor([a, b])
    with torch.no_grad():
        scale = float(smollm.bridge(clean).abs().max())
    tol = 64 * EPS * scale  # two float32 orders of one 30-layer computation (see the unit tests)
    cases = {"logits": ["input", "a3.h2", "a17.h4", "m10", "a29.h8", "m29"],
             "a20.h*<q>": ["input", "a9.h6", "m12", "a19.h8"]}
    for pattern, senders in cases.items():
        receivers = resolve_receivers(engine.graph, pattern)
        ref = masked_sweep(engine, receivers, clean, corrupt, metric, senders, chunk=8)
        fast = [restart_sweep(engine, receivers, clean, corrupt, readout, positions, senders, columns=columns, max_batch=3)]
        if pattern == "logits":
            fast.append(direct_logit_sweep(smollm, clean, corrupt, readout, positions, columns=columns, senders=senders))
        want = torch.tensor([ref.values[int(s[1:].split(".")[0]), int(s.split("h")[1])] if ".h" in s else ref.other[s]
                             for s in senders])
        assert (want - ref.clean).abs().max() > 10 * tol
        for sweep in fast:
            got = torch.tensor([sweep.values[int(s[1:].split(".")[0]), int(s.split("h")[1])] if ".h" in s
                                else sweep.other[s] for s in senders])
            assert (got - want).abs().max() < tol, (pattern, got - want)
            assert abs(sweep.clean - ref.clean) < tol and abs(sweep.corrupt - ref.corrupt) < tol


def test_the_fast_path_self_check_holds_with_margin(smollm):
    """On SmolLM2's 30 layers, at every position (the first one carries terms ~1000x the others), the
    senders rebuild the final residual stream within an eighth of the self-check's tolerance: the margin
    the tolerance's comment claims (measured <= 1.35 eps per position, tolerance 64 eps)."""
    from circuitlab.graph.direct_paths import RECONSTRUCTION_EPS_FACTOR, check_reconstruction, record_direct
    from circuitlab.graph.graph import Graph

    tokens = smollm.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    record = record_direct(smollm, Graph.from_model(smollm), tokens, torch.arange(tokens.shape[1]).unsqueeze(0))
    check_reconstruction(record, "clean")
    terms = (record.outputs.abs().sum(0) + record.constant.abs()).amax(-1)
    error = (record.outputs.sum(0) + record.constant - record.final).abs().amax(-1)
    assert (error <= RECONSTRUCTION_EPS_FACTOR / 8 * EPS * terms).all()
