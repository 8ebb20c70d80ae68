"""The model cache: manifests, verification, rebuild of damaged entries, leftovers, `circuitlab cache`.

The GGUF conversion is replaced by writing a tiny random Llama (a real HF checkpoint of a few KB), so the
whole cold -> warm -> damaged -> rebuilt cycle runs in seconds; tests/integration/models runs the real one.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from circuitlab.errors import CacheError
from circuitlab.models import cache, loading
from circuitlab.models.toy import word_tokenizer


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(root))
    return root


def _tiny_llama(out_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer("a b c d".split())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A file with a valid GGUF header whose 'conversion' writes the tiny Llama; counts conversions."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1))
    conversions = []

    def convert(source, out_dir):
        conversions.append(source)
        _tiny_llama(out_dir)

    monkeypatch.setattr(loading, "_dequantize_gguf", convert)
    return path, conversions


def _logits(model):
    with torch.no_grad():
        return model.logits(model.to_tokens("a b c"))


def test_entry_records_sizes_and_hashes_and_check_catches_damage(cache_dir):
    entry = cache.write_atomically("k", lambda d: (d / "model.safetensors").write_bytes(_safetensors()), {"spec": "x"})
    manifest = cache.read_manifest(entry)
    weights = entry / "model.safetensors"
    assert manifest["files"]["model.safetensors"] == {"size": weights.stat().st_size,
                                                      "sha256": cache.sha256_file(weights)}
    cache.check_entry(entry)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of data flipped: only the hash sees it
    weights.write_bytes(bytes(data))
    assert cache.quick_problem(entry) is None
    with pytest.raises(CacheError, match="does not match its recorded sha256.*circuitlab cache clean"):
        cache.check_entry(entry)
    weights.write_bytes(bytes(data[:-3]))
    with pytest.raises(CacheError, match="model.safetensors is .* bytes, the manifest says"):
        cache.check_entry(entry, hashes=False)


def _safetensors():
    from safetensors.torch import save

    return save({"w": torch.arange(6, dtype=torch.float32)})


def test_cold_warm_damaged_rebuilt(cache_dir, fake_gguf, capfd):
    path, conversions = fake_gguf
    cold = loading.load_model(str(path))
    entry = cache.cached_dir(cache.cache_key(path))
    assert entry is not None and len(conversions) == 1 and cold.extra["cache_dir"] == str(entry)
    reference = _logits(cold)  # now: the weights are memory-mapped, and the damage below rewrites the file
    warm = loading.load_model(str(path))
    assert len(conversions) == 1 and torch.equal(_logits(warm), reference)

    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: a killed copy, a full disk
    capfd.readouterr()
    rebuilt = loading.load_model(str(path))
    err = capfd.readouterr().err
    assert "warning: cache entry" in err and "rebuilding it from" in err and "Traceback" not in err
    assert len(conversions) == 2 and torch.equal(_logits(rebuilt), reference)
    cache.check_entry(entry)

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # silent corruption of the same size: caught by the background hash
    weights.write_bytes(bytes(data))
    again = loading.load_model(str(path))
    assert len(conversions) == 3 and torch.equal(_logits(again), reference)
    assert "sha256" in capfd.readouterr().err


def test_legacy_entry_is_adopted(cache_dir, fake_gguf):
    path, conversions = fake_gguf
    loading.load_model(str(path))
    entry = cache.cached_dir(cache.cache_key(path))
    (entry / cache.MARKER).write_text(json.dumps({"source": str(path), "spec": str(path)}))  # as before manifests
    assert cache.list_entries()[0].status.startswith("legacy")
    loading.load_model(str(path))
    assert len(conversions) == 1
    assert cache.list_entries()[0].status == "verified"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_or_old_conversions_are_removed(cache_dir):
    cache_dir.mkdir()
    host = cache.owner_tag().split("-")[0]
    dead = cache_dir / f".tmp-k.{host}-{_dead_pid()}.abc"
    mine = cache_dir / f".tmp-k.{host}-{os.getpid()}.def"
    old_foreign = cache_dir / ".tmp-k.00000000-1.ghi"
    fresh_foreign = cache_dir / ".tmp-k.00000000-2.jkl"
    for d in (dead, mine, old_foreign, fresh_foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    hours_ago = time.time() - 2 * cache.STALE_S
    os.utime(old_foreign, (hours_ago, hours_ago))
    removed = {item.path for item in cache.remove_leftovers()}
    assert removed == {dead, old_foreign}
    assert mine.exists() and fresh_foreign.exists()  # possibly a conversion in progress


def test_interrupted_write_leaves_nothing_and_files_follow_the_umask(cache_dir):
    def fill(d):
        (d / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.write_atomically("entry", fill, {})
    assert list(cache_dir.iterdir()) == []
    entry = cache.write_atomically("entry", lambda d: os.close(os.open(d / "w", os.O_CREAT | os.O_WRONLY, 0o600)), {})
    mode = 0o666 & ~cache.current_umask()
    assert (entry / "w").stat().st_mode & 0o777 == mode


def test_cli_cache_list_and_clean(cache_dir):
    from circuitlab.cli import app

    entry = cache.write_atomically("k", lambda d: (d / "model.safetensors").write_bytes(_safetensors()), {"spec": "x"})
    leftover = cache_dir / ".tmp-k.00000000-1.abc"
    leftover.mkdir()
    hours_ago = time.time() - 2 * cache.STALE_S
    os.utime(leftover, (hours_ago, hours_ago))
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "list"])
    assert listed.exit_code == 0 and "verified" in listed.output and "temp leftover" in listed.output
    (entry / "model.safetensors").write_bytes(b"garbage")
    assert "damaged" in runner.invoke(app, ["cache", "list"]).output
    cleaned = runner.invoke(app, ["cache", "clean"])
    assert cleaned.exit_code == 0 and not leftover.exists() and entry.exists()
    assert runner.invoke(app, ["cache", "clean", "--all"]).exit_code == 0
    assert list(cache_dir.iterdir()) == []
