"""Logit lens on a toy model: the final norm is a pure RMSNorm, the last depth equals the model's logits,
and the lens equals an independent computation from the weights."""

from __future__ import annotations

import pytest
import torch

from circuitlab.atomic import save_figure_atomically
from circuitlab.errors import TokenizationError
from circuitlab.lens import LensError, lens_from_resid, lens_sites, logit_lens, plot_lens

PROMPT = "When Mary and John went to the store , John gave a drink to"


def _rms_norm_oracle(model, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) * w with the final norm's own weight and epsilon."""
    norm = model.bridge.ln_final._original_component
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight


def test_ln_final_is_a_pure_rms_norm(toy):
    x = torch.randn(3, 5, toy.d_model) * 4
    with torch.no_grad():
        first = toy.bridge.ln_final(x)
        torch.testing.assert_close(first, _rms_norm_oracle(toy, x), atol=1e-5, rtol=1e-5)
        toy.bridge.ln_final(torch.randn(7, 2, toy.d_model))  # another call in between changes nothing
        torch.testing.assert_close(toy.bridge.ln_final(x), first, atol=0, rtol=0)
        torch.testing.assert_close(toy.bridge.ln_final(x[1:2]), first[1:2], atol=1e-6, rtol=1e-6)  # per row


def test_lens_equals_weights_oracle(toy):
    tokens = toy.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = toy.bridge.run_with_cache(tokens)
        resid = cache["blocks.1.hook_resid_pre"][0]
        oracle = _rms_norm_oracle(toy, resid) @ toy.bridge.W_U + toy.bridge.b_U
        torch.testing.assert_close(lens_from_resid(toy, resid), oracle, atol=1e-4, rtol=1e-4)


def test_last_depth_equals_model_logits(toy):
    tokens = toy.to_tokens(PROMPT)
    result = logit_lens(toy, PROMPT, top_k=5)
    with torch.no_grad():
        logits = toy.logits(tokens)[0]
        _, cache = toy.bridge.run_with_cache(tokens)
        lens = lens_from_resid(toy, cache[lens_sites(toy)[-1]][0])
    assert (lens - logits).abs().max() <= 1e-4
    probs, ids = torch.softmax(logits, -1).topk(5, -1)
    assert torch.equal(result.top_ids[-1], ids)
    torch.testing.assert_close(result.top_probs[-1], probs, atol=1e-5, rtol=1e-5)
    assert result.kl[-1].abs().max() < 1e-5


def test_lens_result_consistency(toy, tmp_path):
    result = logit_lens(toy, PROMPT, target="Mary", top_k=4)
    n_depth, n_pos = toy.n_layers + 1, len(toy.to_tokens(PROMPT)[0])
    assert result.top_ids.shape == (n_depth, n_pos, 4)
    assert lens_sites(toy) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert (result.top_probs[..., :-1] >= result.top_probs[..., 1:]).all()
    assert (result.kl >= -1e-6).all()
    mary = toy.single_token_id("Mary")
    is_top1 = result.top_ids[..., 0] == mary
    assert torch.equal(result.target_rank == 1, is_top1)
    torch.testing.assert_close(result.target_prob[is_top1], result.top_probs[..., 0][is_top1])
    in_top4 = (result.top_ids == mary).any(-1)
    assert torch.equal(result.target_rank <= 4, in_top4)
    records = result.records()
    assert len(records) == n_depth * n_pos
    assert {"layer", "pos", "token", "top1", "top1_prob", "target_rank", "target_prob", "kl_final", "top"} <= set(records[0])
    assert result.summary()["target"] == "Mary"
    assert save_figure_atomically(plot_lens(result), tmp_path / "lens.png").stat().st_size > 1000


def test_bad_input(toy):
    with pytest.raises(LensError, match="top_k"):
        logit_lens(toy, PROMPT, top_k=0)
    with pytest.raises(TokenizationError, match="single token"):
        logit_lens(toy, PROMPT, target="Mary John")


def test_cli_lens(tmp_path, toy):
    from typer.testing import CliRunner

    from circuitlab.cli import app
    from circuitlab.models.loading import save_native
    from circuitlab.models.toy import toy_config
    from circuitlab.results import load_results

    model_dir = tmp_path / "model"
    save_native(toy, model_dir, toy_config(d_vocab=len(toy.tokenizer), seed=0))
    out = tmp_path / "lens"
    runner = CliRunner()
    res = runner.invoke(app, ["lens", "--model", str(model_dir), "--prompt", PROMPT, "--target", "Mary", "--top-k", "3",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_results(out)
    n_pos = len(toy.to_tokens(PROMPT)[0])
    assert result.command == "lens" and len(result.records) == (toy.n_layers + 1) * n_pos
    assert (out / "lens.png").is_file() and result.summary["target"] == "Mary"
    res = runner.invoke(app, ["lens", "--model", str(model_dir), "--prompt", PROMPT, "--target", "Mary John",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "single token" in " ".join(res.output.split())
