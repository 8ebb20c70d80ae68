"""Masked-edge engine on toy models: identities, GQA ungrouping, gradients (at c = 1 too), an oracle for logits
edges, and restarted runs against full ones on every toy architecture."""

from __future__ import annotations

import pytest
import torch

from circuitlab.errors import GraphError
from circuitlab.graph.ablation import ablated_outputs
from circuitlab.graph.attention import HeadwiseAttention
from circuitlab.graph.masked import MaskedEdgeEngine
from circuitlab.models.hooks import hook_name
from circuitlab.models.toy import ARCHITECTURES, HF_KINDS, toy_model

WORDS = "a b c d e f g h".split()
EPS = torch.finfo(torch.float32).eps


def tol(reference: torch.Tensor, factor: float = 64) -> float:
    """Tolerance for two float32 computations of the same values in a different order (masked run vs the
    bridge: sums of sender outputs regrouped, attention recomputed from the weights). A reordered float32
    sum differs by a few eps times the magnitude of its terms; measured <= 8 eps * max|value| on these
    models and SmolLM2, so 64 eps leaves an 8x margin while any real edge effect is > 1e3 times larger."""
    return factor * EPS * float(reference.detach().abs().max())


@pytest.fixture(scope="module")
def gqa():
    return toy_model(words=WORDS, n_layers=2, n_key_value_heads=2, seed=3)


def prompts(model, seed=0, batch=2, n_pos=6):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(3, model.d_vocab, (batch, n_pos), generator=gen),
            torch.randint(3, model.d_vocab, (batch, n_pos), generator=gen))


@pytest.mark.parametrize("name", ["toy", "toy_attn_only", "gqa"])
def test_identities(name, request):
    model = request.getfixturevalue(name)
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    with torch.no_grad():
        want_clean, want_corrupt = model.bridge(clean), model.bridge(corrupt)
        n = engine.graph.n_edges
        assert (engine.run(clean, torch.ones(n), ablated) - want_clean).abs().max() < tol(want_clean)
        assert (engine.run(clean, torch.zeros(n), ablated) - want_corrupt).abs().max() < tol(want_corrupt)
        both = engine.run(clean, torch.stack([torch.zeros(n), torch.ones(n)]), ablated)
    assert both.shape == (2, *want_clean.shape)
    assert (both[0] - want_corrupt).abs().max() < tol(want_corrupt)
    assert (both[1] - want_clean).abs().max() < tol(want_clean)
    assert (want_clean - want_corrupt).abs().max() > 10 * tol(want_clean)  # the two identities differ


def test_sender_outputs_sum_to_residual(toy):
    """Senders' outputs + biases (b_O per layer, nothing else here) rebuild the final residual."""
    engine = MaskedEdgeEngine(toy)
    clean, _ = prompts(toy)
    outputs = engine.sender_outputs(clean)
    _, cache = toy.bridge.run_with_cache(clean)
    b_o = sum(toy.bridge.blocks[layer].attn.b_O for layer in range(2))
    final = cache[hook_name("final_norm_in")]
    assert (outputs.sum(0) + b_o - final).abs().max() < tol(final)


def test_gqa_is_ungrouped(gqa):
    """A different k input for head 0 changes head 0 but not head 1, which shares its kv head; with equal
    inputs the per-head attention equals the bridge's hook_z (the fast path's oracle)."""
    clean, corrupt = prompts(gqa)
    _, cache = gqa.bridge.run_with_cache(clean)
    _, other = gqa.bridge.run_with_cache(corrupt)
    attention = HeadwiseAttention(gqa.bridge, 0)
    resid = cache[hook_name("resid_pre", 0)]
    streams = resid.unsqueeze(0).repeat(3 * 4, 1, 1, 1)
    base = attention.z(streams)
    bridge_z = cache[hook_name("z", 0)]
    assert (base - bridge_z).abs().max() < tol(bridge_z)
    streams[4] = other[hook_name("resid_pre", 0)]  # k input of head 0
    changed = attention.z(streams)
    assert (changed[:, 1:, 0] - base[:, 1:, 0]).abs().max() > 10 * tol(bridge_z)
    # Heads 1.. read the same inputs as before; only rounding (none expected) could move them.
    assert (changed[:, :, 1:] - base[:, :, 1:]).abs().max() < tol(bridge_z)


def test_logits_edges_match_cache_oracle(toy):
    """Coefficients on edges into logits only: the final-norm input is resid - sum (1-c)(clean - corrupt)."""
    engine = MaskedEdgeEngine(toy)
    graph = engine.graph
    clean, corrupt = prompts(toy, seed=1)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    coeff = torch.ones(graph.n_edges)
    into_logits = torch.tensor([name.endswith("->logits") for name in graph.edges])
    c = torch.rand(int(into_logits.sum()), generator=torch.Generator().manual_seed(0))
    coeff[into_logits] = c
    diff = engine.sender_outputs(clean) - ablated
    senders = graph.edge_src[into_logits]
    delta = torch.einsum("s,sbpd->bpd", 1 - c, diff[senders])
    want = toy.bridge.run_with_hooks(clean, fwd_hooks=[(hook_name("final_norm_in"), lambda x, hook: x - delta)])
    with torch.no_grad():
        got = engine.run(clean, coeff, ablated)
        plain = toy.bridge(clean)
    assert (got - want).abs().max() < tol(want)
    assert (want - plain).abs().max() > 10 * tol(want)  # the coefficients moved the logits


def test_coefficients_are_differentiable(toy):
    """Autograd through the coefficients matches central differences. In float32 the difference quotient
    has truncation error ~h^2 |f'''| / 6 and rounding error delta / h (delta: the rounding of f, bounded by
    `tol` of the two logits summed); h = eps^(1/3) balances the two (Numerical Recipes 5.7). The bridge
    runs parts of its norms in float32 even for float64 weights, so float64 would not remove the rounding."""
    engine = MaskedEdgeEngine(toy)
    clean, corrupt = prompts(toy, seed=2)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    base = torch.rand(engine.graph.n_edges, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    coeff = base.clone().requires_grad_(True)
    logits = engine.run(clean, coeff, ablated)
    (grad,) = torch.autograd.grad(logits[:, -1, 5].sum(), coeff)
    h = EPS ** (1 / 3)
    rounding = 2 * tol(logits[:, -1, 5].detach()) / h  # two logits summed, each within tol
    strongest = int(grad.abs().argmax())
    assert abs(float(grad[strongest])) > 10 * rounding  # the check below can tell a wrong gradient
    for e in [0, 40, strongest, engine.graph.n_edges - 1]:
        step = torch.zeros_like(base)
        step[e] = h
        with torch.no_grad():
            up = engine.run(clean, base + step, ablated)[:, -1, 5].sum()
            down = engine.run(clean, base - step, ablated)[:, -1, 5].sum()
        # rel=h bounds the truncation term h^2 |f'''| / 6 for any |f'''| <= 6 |f'| / h
        assert float(grad[e]) == pytest.approx(float(up - down) / (2 * h), rel=h, abs=rounding)


def test_ablation_kinds(toy):
    engine = MaskedEdgeEngine(toy)
    clean, corrupt = prompts(toy, seed=3)
    n = engine.graph.n_edges
    outputs = engine.sender_outputs(corrupt)
    mean = ablated_outputs(engine, "mean", clean, reference=corrupt)
    # The same float32 sums (concatenated chunks, then the mean): equal up to one rounding per element.
    assert (mean[:, 0] - outputs.mean(1)).abs().max() <= tol(outputs, factor=4)
    one = corrupt[:1]
    resampled = ablated_outputs(engine, "resample", clean, reference=one)
    with torch.no_grad():  # a one-prompt reference: resample and mean both equal patching with that prompt
        want = toy.bridge(one).expand(2, -1, -1)
        assert (engine.run(clean, torch.zeros(n), resampled) - want).abs().max() < tol(want)
    zero = ablated_outputs(engine, "zero", clean)
    assert zero.shape == (engine.graph.n_senders, 1, clean.shape[1], 32) and not zero.any()
    with pytest.raises(GraphError, match="unknown ablation"):
        ablated_outputs(engine, "noise", clean)
    with pytest.raises(GraphError, match="same token length"):
        ablated_outputs(engine, "mean", clean, reference=corrupt[:, :3])
    with pytest.raises(GraphError, match="corrupt tokens"):
        ablated_outputs(engine, "corrupt", clean)


def test_bad_coefficients_and_ablations(toy):
    engine = MaskedEdgeEngine(toy)
    clean, corrupt = prompts(toy)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    with pytest.raises(GraphError, match="shape"):
        engine.run(clean, torch.ones(engine.graph.n_edges + 1), ablated)
    with pytest.raises(GraphError, match="ablated sender outputs"):
        engine.run(clean, torch.ones(engine.graph.n_edges), ablated[:, :, :3])


# --- gradients at c = 1 -----------------------------------------------------------------------------------
def test_gradient_at_every_edge_kept(toy):
    """At c = 1 the forward skips every (1 - c) term, the backward must not: dm/dc there is EAP's
    (out_s - abl_s) . dm/d(input of r). Checked against one-sided second-order differences
    (3 m(1) - 4 m(1-h) + m(1-2h)) / 2h, whose O(h^2) truncation error |d_h - d_2h| bounds (x 4/3, taken
    x 2), plus the float32 rounding of m: 2 tol / h (tol: two orders of the same sum, see `tol`)."""
    engine = MaskedEdgeEngine(toy)
    graph = engine.graph
    clean, corrupt = prompts(toy, seed=4)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    ones = torch.ones(graph.n_edges, requires_grad=True)
    logits = engine.run(clean, ones, ablated)
    (grad,) = torch.autograd.grad(logits[:, -1, 5].sum(), ones)
    picks = [graph.edge_id(e) for e in ("input->a0.h1<q>", "input->a1.h0<k>", "a0.h2->a1.h3<v>", "a0.h0->m0",
                                        "m0->m1", "a1.h1->logits", "input->logits")]
    h = 0.05
    rows = torch.ones(3 * len(picks), graph.n_edges)
    for i, e in enumerate(picks):
        rows[3 * i:3 * i + 3, e] = torch.tensor([1 - h, 1 - 2 * h, 1 - 4 * h])
    with torch.no_grad():
        base = float(logits[:, -1, 5].sum())
        m = engine.run(clean, rows, ablated)[:, :, -1, 5].sum(-1).double().view(len(picks), 3)
    d_h = (3 * base - 4 * m[:, 0] + m[:, 1]) / (2 * h)
    d_2h = (3 * base - 4 * m[:, 1] + m[:, 2]) / (4 * h)
    bound = 2 * (d_h - d_2h).abs() + 2 * tol(logits[:, -1, 5]) / h
    assert ((grad[picks].double() - d_h).abs() <= bound).all(), (grad[picks], d_h, bound)
    assert (d_h.abs() > 10 * bound).sum() >= 4  # the check has teeth
    assert int((grad != 0).sum()) > graph.n_edges // 2  # no edge silently dropped at c = 1


# --- restarted runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arch_models(architecture_models):
    return lambda name: architecture_models(name, words=WORDS_12, n_layers=3)


WORDS_12 = "a b c d e f g h i j k l".split()


def late_rows(engine, gen):
    """One random coefficient set per restart layer r = 1..L: edges into layers >= r in (0, 1), the rest 1."""
    rows = []
    for start in range(1, engine.graph.shape.n_layers + 1):
        row = torch.rand(engine.graph.n_edges, generator=gen) * 0.9
        row[engine.edge_layer < start] = 1.0
        rows.append(row)
    return torch.stack(rows)


class BlockCalls:
    """Counts calls of each block (a restarted run must not run the blocks before its layer)."""

    def __init__(self, bridge):
        self.counts = [0] * len(bridge.blocks)
        self.handles = [block.register_forward_pre_hook(self._hook(i)) for i, block in enumerate(bridge.blocks)]

    def _hook(self, i):
        def hook(module, args):
            self.counts[i] += 1
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", [*ARCHITECTURES, *(f"hf_{kind}" for kind in HF_KINDS)])
def test_restarted_runs_equal_full_runs(name, arch_models):
    """Restarted at each layer r (only edges into layers >= r differ from 1) vs the full masked run: the
    same sums, the senders before r taken from the recorded clean run instead of this one, so equal up to
    `tol` (measured <= 3 eps x max|logit| on every architecture here); with max_batch=3 (one row of two
    prompts per forward) too. Blocks before r are not run."""
    model = arch_models(name)
    engine = MaskedEdgeEngine(model)
    assert engine.restart_error is None
    clean, corrupt = prompts(model, seed=5, n_pos=7)  # longer than the Gemma-shaped sliding window of 4
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    rows = late_rows(engine, torch.Generator().manual_seed(6))
    record = engine.record(clean)
    with torch.no_grad():
        full = engine.run(clean, rows, ablated)
        plain = model.bridge(clean)
        calls = BlockCalls(model.bridge)
        try:
            for i, row in enumerate(rows):
                assert engine.restart_layer(row) == i + 1
                before = list(calls.counts)
                got = engine.run(clean, row, ablated, record=record)
                ran = [after - b for after, b in zip(calls.counts, before, strict=True)]
                assert ran == [0] * (i + 1) + [1] * (len(ran) - i - 1)
                assert (got - full[i]).abs().max() < tol(full[i])
                assert (full[i] - plain).abs().max() > 10 * tol(plain)  # the coefficients matter
            chunked = engine.run(clean, rows, ablated, record=record, max_batch=3)
        finally:
            calls.close()
    assert (chunked - full).abs().max() < tol(full)


@pytest.mark.parametrize("name", [*ARCHITECTURES, *(f"hf_{kind}" for kind in HF_KINDS)])
def test_runs_restarted_from_a_masked_record_equal_full_runs(name, arch_models):
    """A record of a masked run (a random base: every edge in (0, 1] or 0) serves rows that differ from the
    base only on edges into layers >= r: they restart at r and equal the full masked run up to `tol`; the
    restart layer is measured from the base, not from 1."""
    model = arch_models(name)
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model, seed=11, n_pos=7)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    gen = torch.Generator().manual_seed(12)
    base = torch.rand(engine.graph.n_edges, generator=gen)
    base[torch.rand(engine.graph.n_edges, generator=gen) < 0.5] = 0.0  # a circuit-like base: half the edges off
    record = engine.record(clean, base, ablated)
    rows = late_rows(engine, gen)
    rows = torch.where(rows == 1.0, base, rows)  # each row: the base, other values from its restart layer on
    with torch.no_grad():
        full = engine.run(clean, rows, ablated)
        same = engine.run(clean, base, ablated, record=record)  # nothing differs: only the unembedding runs
        calls = BlockCalls(model.bridge)
        try:
            for i, row in enumerate(rows):
                assert engine.restart_layer(row, base) == i + 1 and engine.restart_layer(row) == 0
                before = list(calls.counts)
                got = engine.run(clean, row, ablated, record=record)
                ran = [after - b for after, b in zip(calls.counts, before, strict=True)]
                assert ran == [0] * (i + 1) + [1] * (len(ran) - i - 1)  # only blocks from the restart layer on
                assert (got - full[i]).abs().max() < tol(full[i])
        finally:
            calls.close()
    assert (same - engine.run(clean, base, ablated)).abs().max() < tol(same)
    other = ablated_outputs(engine, "zero", clean)
    with pytest.raises(GraphError, match="other ablated outputs"):
        engine.run(clean, rows[0], other, record=record)
    with pytest.raises(GraphError, match="ablated"):
        engine.record(clean, base)


def test_restart_with_grad_chunks_and_errors(toy):
    """Coefficients that require grad run in full (upstream edges need their gradient); max_batch only
    changes the cost, with grad too; a record of other tokens, a bad max_batch and a disabled restart."""
    engine = MaskedEdgeEngine(toy)
    clean, corrupt = prompts(toy, seed=7)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    record = engine.record(clean)
    rows = late_rows(engine, torch.Generator().manual_seed(8))
    leaf = rows.clone().requires_grad_(True)
    whole = engine.run(clean, leaf, ablated, record=record)
    (grad,) = torch.autograd.grad(whole[..., -1, 5].sum(), leaf)
    split = engine.run(clean, leaf, ablated, record=record, max_batch=2)
    (grad_split,) = torch.autograd.grad(split[..., -1, 5].sum(), leaf)
    assert (split - whole).abs().max() < tol(whole)
    assert (grad_split - grad).abs().max() <= tol(grad)
    assert bool((grad[:, engine.edge_layer == 0] != 0).any())  # edges upstream of the restart layer
    with pytest.raises(GraphError, match="other tokens"):
        engine.run(corrupt, rows, ablated, record=record)
    with pytest.raises(GraphError, match="max_batch"):
        engine.run(clean, rows, ablated, max_batch=0)
    engine.restart_error = "disabled for the test"  # restarts off: full runs, same numbers
    calls = BlockCalls(toy.bridge)
    try:
        with torch.no_grad():
            fallback = engine.run(clean, rows[1], ablated, record=record)
    finally:
        calls.close()
    assert calls.counts[0] == 1 and (fallback - whole[1]).abs().max() < tol(whole)


@pytest.mark.parametrize("name", [*ARCHITECTURES, *(f"hf_{kind}" for kind in HF_KINDS)])
def test_positions_are_the_gathered_logits(name, arch_models):
    """positions= returns the full run's logits at those positions, restarted or not, on every architecture
    (HF GPT-2 reshapes the hidden states to the full sequence after its final norm, so the read positions
    are gathered at the unembedding's input). The same final norm and unembedding of the same rows: equal
    up to `tol` (the unembedding of fewer rows may pick another matmul blocking)."""
    model = arch_models(name)
    engine = MaskedEdgeEngine(model)
    clean, corrupt = prompts(model, seed=9)
    ablated = ablated_outputs(engine, "corrupt", clean, corrupt=corrupt)
    rows = late_rows(engine, torch.Generator().manual_seed(10))
    positions = torch.tensor([[5, 2], [0, 5]])
    with torch.no_grad():
        full = engine.run(clean, rows, ablated)
        want = full[:, torch.arange(2).unsqueeze(1), positions]  # [k, batch, 2, vocab]
        plain = engine.run(clean, rows, ablated, positions=positions)
        restarted = engine.run(clean, rows, ablated, positions=positions, record=engine.record(clean))
    assert plain.shape == want.shape == restarted.shape
    assert (plain - want).abs().max() < tol(want)
    assert (restarted - want).abs().max() < tol(want)
    leaf = rows.clone().requires_grad_(True)  # the gradient path gathers the same way
    gathered = engine.run(clean, leaf, ablated, positions=positions)
    assert (gathered.detach() - want).abs().max() < tol(want)
    with pytest.raises(GraphError, match="positions must be"):
        engine.run(clean, rows, ablated, positions=torch.tensor([[6], [0]]))
