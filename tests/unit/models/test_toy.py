"""Toy model builders: one native config per supported architecture, and tiny HF model directories."""

from __future__ import annotations

import pytest

from circuitlab.models.toy import ARCHITECTURES, tiny_hf_dir, toy_config, toy_model


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_builds_what_it_names(name):
    model = toy_model(words="a b c".split(), n_layers=1, seed=0, **ARCHITECTURES[name])
    cfg, block = model.cfg, model.bridge.blocks[0]
    assert cfg.attention_dir == ARCHITECTURES[name].get("attention_dir", "causal")
    assert model.attn_only == (name == "attention_only") and hasattr(block, "mlp") != model.attn_only
    assert model.bridge.blocks[0].attn.original_component.causal == (cfg.attention_dir == "causal")


def test_config_defaults_stay_rms_rotary_causal_gelu():
    cfg = toy_config()
    assert (cfg["normalization_type"], cfg["positional_embedding_type"], cfg["attention_dir"], cfg["act_fn"]) == (
        "RMS", "rotary", "causal", "gelu")


def test_unknown_hf_kind(tmp_path):
    with pytest.raises(ValueError, match="llama, gpt2, gemma3"):
        tiny_hf_dir("bert", tmp_path, ["a"])
