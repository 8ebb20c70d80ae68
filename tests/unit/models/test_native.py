"""TransformerLens-format model dirs: written by hand (HookedTransformer keys), by `save_native` (bridge keys)
and by circuitlab's older `save_native` (native_config.json); each loads and computes what its weights say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuitlab import load_model
from circuitlab.errors import ModelLoadError
from circuitlab.models.loading import ModelSource, check_spec, load_native, save_native
from circuitlab.models.toy import toy_config, toy_model

# A float64 forward differs from a hand computation of the same maths in float64 by rounding only: a few
# hundred operations on values of order 10, each off by at most eps64 relative, stay far below 1e4 * eps64.
# A real mistake (a wrong head order, rotary layout, mask or scale) changes logits by O(0.1) or more.
TOL64 = 1e4 * torch.finfo(torch.float64).eps
# The native model computes RMS norms and rotary cos/sin in float32 even when the model is float64 (by
# design, as HF Llama does): a handful of float32 roundings (relative error eps32 each) on logits of order
# 1 to 10 stay below 32 * eps32 relative; the measured error is about 0.5 * eps32.
TOL_F32_PARTS = 32 * torch.finfo(torch.float32).eps

GPT2_SHAPE = dict(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, d_vocab_out=5, n_ctx=12,
                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                  attention_dir="causal", attn_only=False, eps=1e-5, attn_scale=math.sqrt(8.0))
# Rotary on the first half of each head, HookedTransformer's rotate-halves layout (rotary_adjacent_pairs
# false, its default), no MLP, bidirectional: the layout conversion is what this shape tests.
ROTARY_SHAPE = dict(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=13, n_ctx=12, act_fn="relu",
                    normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4, rotary_base=10000,
                    attention_dir="bidirectional", attn_only=True, eps=1e-5)


def hooked_transformer_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights keyed and shaped the way HookedTransformer.state_dict() has them."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    d, h, dh = cfg["d_model"], cfg["n_heads"], cfg["d_head"]
    out = cfg.get("d_vocab_out", cfg["d_vocab"])
    w = {"embed.W_E": rand(cfg["d_vocab"], d, scale=1.0), "unembed.W_U": rand(d, out), "unembed.b_U": rand(out)}
    if cfg["positional_embedding_type"] == "standard":
        w["pos_embed.W_pos"] = rand(cfg["n_ctx"], d)
    norm = ["w", "b"] if cfg["normalization_type"] == "LN" else ["w"]
    for name in norm:
        w[f"ln_final.{name}"] = 1 + rand(d) if name == "w" else rand(d)
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}"
        for x in "QKV":
            w[f"{p}.attn.W_{x}"] = rand(h, d, dh)
            w[f"{p}.attn.b_{x}"] = rand(h, dh)
        w[f"{p}.attn.W_O"] = rand(h, dh, d)
        w[f"{p}.attn.b_O"] = rand(d)
        w[f"{p}.attn.mask"] = torch.tril(torch.ones(cfg["n_ctx"], cfg["n_ctx"])).bool()  # a buffer HT saves
        w[f"{p}.attn.IGNORE"] = torch.tensor(-1e5)
        lns = ["ln1"] if cfg["attn_only"] else ["ln1", "ln2"]
        for ln in lns:
            for name in norm:
                w[f"{p}.{ln}.{name}"] = 1 + rand(d) if name == "w" else rand(d)
        if not cfg["attn_only"]:
            w[f"{p}.mlp.W_in"], w[f"{p}.mlp.b_in"] = rand(d, cfg["d_mlp"]), rand(cfg["d_mlp"])
            w[f"{p}.mlp.W_out"], w[f"{p}.mlp.b_out"] = rand(cfg["d_mlp"], d), rand(d)
    return w


def hand_forward(cfg: dict, w: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """HookedTransformer's forward written out in float64: [pos, d_vocab_out] logits."""
    w = {k: v.double() for k, v in w.items()}
    n = len(tokens)
    x = w["embed.W_E"][tokens]
    if cfg["positional_embedding_type"] == "standard":
        x = x + w["pos_embed.W_pos"][:n]

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        if cfg["normalization_type"] == "LN":
            x = x - x.mean(-1, keepdim=True)
            return x / (x.pow(2).mean(-1, keepdim=True) + cfg["eps"]).sqrt() * w[f"{prefix}.w"] + w[f"{prefix}.b"]
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg["eps"]).sqrt() * w[f"{prefix}.w"]

    def rotate(x: torch.Tensor) -> torch.Tensor:  # x: [pos, head, d_head]; rotate halves of the first rd dims
        rd = cfg["rotary_dim"]
        half = rd // 2
        freq = cfg["rotary_base"] ** (-torch.arange(half, dtype=torch.float64) / half)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        rot, rest = x[..., :rd], x[..., rd:]
        turned = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * cos + turned * sin, rest], -1)

    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}.attn"
        y = norm(x, f"blocks.{layer}.ln1")
        q, k, v = (torch.einsum("pd,hde->phe", y, w[f"{p}.W_{c}"]) + w[f"{p}.b_{c}"] for c in "QKV")
        if cfg["positional_embedding_type"] == "rotary":
            q, k = rotate(q), rotate(k)
        scores = torch.einsum("qhe,khe->hqk", q, k) / math.sqrt(cfg["d_head"])
        if cfg["attention_dir"] == "causal":
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        z = torch.einsum("hqk,khe->qhe", scores.softmax(-1), v)
        x = x + torch.einsum("qhe,hed->qd", z, w[f"{p}.W_O"]) + w[f"{p}.b_O"]
        if not cfg["attn_only"]:
            m = f"blocks.{layer}.mlp"
            pre = norm(x, f"blocks.{layer}.ln2") @ w[f"{m}.W_in"] + w[f"{m}.b_in"]
            x = x + torch.nn.functional.gelu(pre, approximate="tanh") @ w[f"{m}.W_out"] + w[f"{m}.b_out"]
    return norm(x, "ln_final") @ w["unembed.W_U"] + w["unembed.b_U"]


def write_tl_dir(path: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("cfg, tol", [(GPT2_SHAPE, TOL64), (ROTARY_SHAPE, TOL_F32_PARTS)],
                         ids=["layernorm-learned-positions", "rms-rotary-halves"])
def test_hand_written_hooked_transformer_dir_computes_its_weights(tmp_path, cfg, tol):
    weights = hooked_transformer_weights(cfg, seed=1)
    path = write_tl_dir(tmp_path / "tl", cfg, weights)
    assert check_spec(path) == ModelSource("tl_dir", str(path), path)
    model = load_model(path, dtype=torch.float64)
    assert model.tokenizer is None and model.d_vocab == cfg["d_vocab"]
    assert model.d_vocab_out == cfg.get("d_vocab_out", cfg["d_vocab"])
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ours = model.logits(torch.tensor([tokens]))[0]
    want = hand_forward(cfg, weights, tokens)
    assert want.abs().max() > 1.0  # logits of order 1: the comparison below is not vacuous
    assert (ours - want).abs().max().item() <= tol * want.abs().max().item()


def test_rotary_layout_matters(tmp_path):
    """Read as adjacent pairs (no conversion), the same rotary weights compute something else."""
    weights = hooked_transformer_weights(ROTARY_SHAPE, seed=1)
    path = write_tl_dir(tmp_path / "tl", dict(ROTARY_SHAPE, rotary_adjacent_pairs=True), weights)
    with torch.no_grad():
        ours = load_model(path, dtype=torch.float64).logits(torch.tensor([[3, 1, 4, 1, 5]]))[0]
    assert (ours - hand_forward(ROTARY_SHAPE, weights, [3, 1, 4, 1, 5])).abs().max() > 1e-3


def test_hooked_transformer_and_bridge_keys_of_the_same_weights_agree(tmp_path):
    weights = hooked_transformer_weights(GPT2_SHAPE, seed=2)
    from_ht = load_model(write_tl_dir(tmp_path / "ht", GPT2_SHAPE, weights))
    bridge_keyed = write_tl_dir(tmp_path / "bridge", GPT2_SHAPE, from_ht.bridge.state_dict())
    again = load_model(bridge_keyed)
    tokens = torch.tensor([[0, 5, 10, 2]])
    with torch.no_grad():
        assert torch.equal(from_ht.logits(tokens), again.logits(tokens))  # same weights, same float32 code


def test_save_native_round_trip_writes_each_tensor_once(tmp_path, toy):
    out = save_native(toy, tmp_path / "m")
    assert check_spec(out).kind == "tl_dir" and not (out / "native_config.json").exists()
    saved = load_file(str(out / "model.safetensors"))
    # state_dict() names each tensor once; the internal keys the older format stored repeat each 2-4 times
    assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in toy.bridge.state_dict().values())
    internal = toy.bridge.original_model.state_dict()
    assert sum(t.numel() for t in internal.values()) > 2 * sum(t.numel() for t in saved.values())
    config = json.loads((out / "config.json").read_text())
    assert "model_type" not in config and config["d_model"] == toy.d_model
    again = load_model(out)
    tokens = toy.to_tokens("When Mary and John went to the store")
    with torch.no_grad():
        assert torch.equal(toy.logits(tokens), again.logits(tokens))  # same weights and code: bit-identical
    assert again.encode("Mary John") == toy.encode("Mary John")


@pytest.mark.parametrize("shape", [dict(positional_embedding_type="standard", normalization_type="LN"),
                                   dict(normalization_type=None, attn_only=True),
                                   dict(n_key_value_heads=2)], ids=["layernorm", "no-norm-attn-only", "gqa"])
def test_save_native_round_trip_other_shapes(tmp_path, shape):
    model = toy_model(words=None, d_vocab=20, n_layers=2, seed=3, **shape)
    again = load_model(save_native(model, tmp_path / "m"))
    tokens = torch.tensor([[1, 7, 19, 4]])
    with torch.no_grad():
        assert torch.equal(model.logits(tokens), again.logits(tokens))


def test_directory_in_the_older_native_format_still_loads(tmp_path, toy):
    """native_config.json + the bridge's internal `_original_component` keys, as circuitlab wrote them before."""
    cfg = toy_config(d_vocab=len(toy.tokenizer), seed=0)
    old = tmp_path / "old"
    old.mkdir()
    (old / "native_config.json").write_text(json.dumps(cfg))
    internal = {k: v.detach().contiguous().clone() for k, v in toy.bridge.original_model.state_dict().items()}
    save_file(internal, str(old / "model.safetensors"))
    toy.tokenizer.save_pretrained(str(old))
    assert check_spec(old).kind == "native_dir"
    again = load_model(old)
    tokens = toy.to_tokens("Then Mary gave a drink to")
    with torch.no_grad():
        assert torch.equal(toy.logits(tokens), again.logits(tokens))


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path, toy):
    out = save_native(toy, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, n_layers=3)))
    with pytest.raises(ModelLoadError, match="lacks the weight|does not fit"):
        load_model(out)
    weights = hooked_transformer_weights(GPT2_SHAPE, seed=0)
    wrong_heads = write_tl_dir(tmp_path / "heads", dict(GPT2_SHAPE, n_heads=4, d_head=4), weights)
    with pytest.raises(ModelLoadError, match="does not fit .*shape"):
        load_model(wrong_heads)


def test_nonzero_parameter_the_config_has_no_place_for_is_refused(tmp_path):
    weights = hooked_transformer_weights(GPT2_SHAPE, seed=0)
    weights["blocks.0.mlp.b_gate"] = torch.ones(GPT2_SHAPE["d_mlp"])
    with pytest.raises(ModelLoadError, match="no parameter for 'blocks.0.mlp.gate.bias'"):
        load_model(write_tl_dir(tmp_path / "m", GPT2_SHAPE, weights))


def test_missing_biases_are_zero(tmp_path):
    weights = hooked_transformer_weights(GPT2_SHAPE, seed=0)
    weights = {k: torch.zeros_like(v) if k.endswith(("b_Q", "b_U")) else v for k, v in weights.items()}
    without = {k: v for k, v in weights.items() if not k.endswith(("b_Q", "b_U"))}
    a = load_model(write_tl_dir(tmp_path / "with", GPT2_SHAPE, weights))
    b = load_model(write_tl_dir(tmp_path / "without", GPT2_SHAPE, without))
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(a.logits(tokens), b.logits(tokens))


def test_save_native_refuses_a_non_native_model(tmp_path, toy):
    from dataclasses import replace

    class HFLike:
        cfg = type("Cfg", (), {"architecture": "LlamaForCausalLM"})()

    with pytest.raises(ModelLoadError, match="save_pretrained"):
        save_native(replace(toy, bridge=HFLike()), tmp_path / "m")


def test_native_config_dict_still_loads_directly():
    model = load_native(toy_config(n_layers=1, d_vocab=10))
    assert model.n_layers == 1 and model.d_vocab_out == 10
