"""Model loading and tokenizer helpers on toy models (fast)."""

from __future__ import annotations

import pytest
import torch

from circuitlab import load_model
from circuitlab.errors import ModelLoadError, TokenizationError
from circuitlab.models import loading
from circuitlab.models.loading import ModelSource, check_spec, save_native
from circuitlab.models.toy import toy_config, toy_model


def test_bos_policy_prepends_bos_once(toy):
    ids = toy.encode(" Mary John")
    assert ids[0] == toy.bos_token_id
    assert ids.count(toy.bos_token_id) == 1
    assert toy.to_tokens(["Mary John"]).tolist() == [ids]


def test_single_token_id_and_split_error(toy):
    assert toy.single_token_id(" Mary") == toy.encode("Mary", bos=False)[0]
    with pytest.raises(TokenizationError, match=r"2 tokens \['Mary', 'John'\]"):
        toy.single_token_id(" Mary John")


def test_to_tokens_rejects_unequal_lengths_and_empty(toy):
    with pytest.raises(TokenizationError, match="different token lengths"):
        toy.to_tokens(["Mary John", "Mary"])
    with pytest.raises(TokenizationError, match="empty list"):
        toy.to_tokens([])


def test_check_tokens_context_and_vocab(toy):
    with pytest.raises(TokenizationError, match="context"):
        toy.check_tokens(torch.zeros(1, toy.n_ctx + 1, dtype=torch.long))
    with pytest.raises(TokenizationError, match="token ids must lie"):
        toy.check_tokens(torch.full((1, 3), toy.d_vocab, dtype=torch.long))


def test_model_without_tokenizer_names_the_fix():
    m = toy_model(words=None, d_vocab=20)
    with pytest.raises(TokenizationError, match="no tokenizer"):
        m.encode("hello")
    assert m.str_tokens([1, 2]) == ["<1>", "<2>"]


@pytest.mark.parametrize(
    "spec, message",
    [("no-such-model", "unknown model spec"), ("/nonexistent/file.gguf", "does not exist")],
)
def test_bad_specs(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_dir_without_config_is_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither config.json"):
        load_model(tmp_path)


def test_native_config_dict_and_bad_type():
    m = load_model(toy_config(n_layers=1, d_vocab=10))
    assert m.n_layers == 1 and m.d_vocab == 10
    with pytest.raises(ModelLoadError, match="cannot load a model from a int"):
        load_model(42)


def test_check_spec_names_each_source_without_loading(tmp_path, toy, monkeypatch):
    cfg = toy_config(d_vocab=len(toy.tokenizer), seed=0)
    save_native(toy, tmp_path / "native", cfg)
    assert check_spec(tmp_path / "native") == ModelSource("tl_dir", str(tmp_path / "native"), tmp_path / "native")
    assert check_spec("smollm2-135m").kind == "known"
    assert check_spec(cfg).kind == "config"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_probe", lambda host, port: None)  # a reachable hub: load by id
    assert check_spec("org/model") == ModelSource("hub", "org/model", None)
    with pytest.raises(ModelLoadError, match=r"model path org/model/x does not exist"):
        check_spec("org/model/x")  # two slashes: a path, not a hub id


def test_offline_hub_id_in_the_local_hf_cache_loads_from_its_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_files_only: str(tmp_path))
    assert check_spec("org/model") == ModelSource("hub", "org/model", tmp_path)
