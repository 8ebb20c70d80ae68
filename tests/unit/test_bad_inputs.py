"""A catalogue of bad inputs, each built in tmp_path by the test: every one is a `CircuitlabError` whose
message says what is wrong and how to fix it, never a traceback from a library underneath.

Each row: a name, a builder that writes the input and returns the action to try (called with the toy
model, for rows that need one), the expected error class (None: the input must simply be accepted) and a
regex the message must match (its fix, where there is one).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from circuitlab.errors import CacheError, CircuitlabError, MetricError, ModelLoadError, TaskError
from circuitlab.models import cache, loading
from circuitlab.tasks.files import load_task_file

ROW = {"clean": "Mary gave a drink to", "corrupt": "Tom gave a drink to", "answer": " John", "wrong": " Mary"}
Action = Callable[[Any], object]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, pytest.MonkeyPatch], Action]
    error: type[CircuitlabError] | None
    match: str = ""


# --- builders -----------------------------------------------------------------------------------------

def task_file(content: bytes | str, suffix: str = ".jsonl", *, prepare: bool = False, metric: str | None = None):
    def build(tmp: Path, _: pytest.MonkeyPatch) -> Action:
        path = tmp / f"task{suffix}"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        if prepare:
            return lambda toy: load_task_file(path, metric=metric).prepare(toy)
        return lambda _toy: load_task_file(path, metric=metric)
    return build


def jsonl(**fields: Any) -> str:
    return json.dumps({**ROW, **fields}) + "\n"


def model_file(name: str, content: bytes, **siblings: bytes):
    """A file `name` (with sibling files) under tmp/model, loaded as a model spec."""
    def build(tmp: Path, _: pytest.MonkeyPatch) -> Action:
        directory = tmp / "model"
        directory.mkdir()
        for file, data in {name: content, **siblings}.items():
            (directory / file).write_bytes(data)
        spec = directory / name if name.endswith(".gguf") else directory
        return lambda _toy: loading.load_model(spec)
    return build


def safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.zeros(8)})


def cache_entry(damage: Callable[[Path], None], *, legacy: bool = False):
    def build(tmp: Path, _: pytest.MonkeyPatch) -> Action:
        entry = cache.write_atomically("entry", lambda d: (d / "model.safetensors").write_bytes(safetensors_bytes()),
                                       {"spec": "test"})
        if legacy:
            (entry / cache.MARKER).write_text('{"spec": "test"}')
        damage(entry / "model.safetensors")
        return lambda _toy: cache.check_entry(entry)
    return build


def spec(text: str, *, env: dict[str, str] | None = None, chdir_with: str | None = None):
    def build(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Action:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(loading, "_PROBES", {})
        if chdir_with is not None:
            (tmp / chdir_with).mkdir()
            monkeypatch.chdir(tmp)
        return lambda _toy: loading.load_model(text)
    return build


HF_CONFIG = json.dumps({"model_type": "llama"}).encode()
NATIVE_CONFIG = json.dumps({"n_layers": 1}).encode()
TL_FIELDS = dict(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, act_fn="relu", d_vocab=5, n_ctx=4)


def tl_config(**fields: Any) -> bytes:
    return json.dumps({k: v for k, v in {**TL_FIELDS, **fields}.items() if v is not None}).encode()

GOOD = safetensors_bytes()
GGUF_HEADER = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x93garbage" * 10)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CASES = [
    # task files
    Case("task: not UTF-8 (jsonl)", task_file(b'{"clean": "caf\xe9"}\n'), TaskError, r"not UTF-8 .*save it as UTF-8"),
    Case("task: not UTF-8 (csv)", task_file(b"clean,corrupt,answer\ncaf\xe9,a,b\n", ".csv"), TaskError,
         r"not UTF-8 .*save it as UTF-8"),
    Case("task: UTF-8 BOM (jsonl) is accepted", task_file(b"\xef\xbb\xbf" + jsonl().encode()), None),
    Case("task: UTF-8 BOM (csv) is accepted",
         task_file(b"\xef\xbb\xbfclean,corrupt,answer\nMary gave a drink to,Tom gave a drink to, John\n", ".csv"), None),
    Case("task: a line is a JSON list", task_file('["Mary", "John"]\n'), TaskError, r":1 is a JSON list.*JSON object"),
    Case("task: a line is a JSON number", task_file(jsonl() + "42\n"), TaskError, r":2 is a JSON number.*JSON object"),
    Case("task: clean is a number", task_file(jsonl(clean=5)), TaskError, r":1: field 'clean' must be a string"),
    Case("task: corrupt is a list", task_file(jsonl(corrupt=["a"])), TaskError, r"field 'corrupt' must be a string"),
    Case("task: answer is a number", task_file(jsonl(answer=7)), TaskError,
         r"field 'answer' must be a string or a list of strings"),
    Case("task: answer list holds a number", task_file(jsonl(answer=[" John", 3])), TaskError,
         r"field 'answer' must be a string or a list of strings"),
    Case("task: wrong is an object", task_file(jsonl(wrong={"a": 1})), TaskError, r"field 'wrong' must be a string"),
    Case("task: clean_ids holds text", task_file(jsonl(clean_ids=["Mary"])), TaskError,
         r"'clean_ids' must be a list of integer token ids"),
    Case("task: answer_pos is text", task_file(jsonl(answer_pos="last")), TaskError, r"'answer_pos' must be an integer"),
    Case("task: csv ids not integers", task_file("clean_ids,corrupt,answer\n1|x,a,b\n", ".csv"), TaskError,
         r"'clean_ids' must hold integers separated by '\|'"),
    Case("task: empty file", task_file(b""), TaskError, r"holds no examples; each example needs"),
    Case("task: blank lines only", task_file("\n  \n\n"), TaskError, r"holds no examples"),
    Case("task: csv header only", task_file("clean,corrupt,answer\n", ".csv"), TaskError, r"holds no examples"),
    Case("task: answer id outside the vocabulary", task_file(jsonl(answer_ids=[10**6]), prepare=True), TaskError,
         r"answer token id 1000000 is outside .*vocabulary.*must come from this model's tokenizer"),
    Case("task: clean_ids outside the vocabulary",
         task_file(jsonl(clean_ids=[0, 10**6], corrupt_ids=[0, 1]), prepare=True), TaskError,
         r"clean prompt token id 1000000 is outside"),
    Case("task: a row without an answer names output:K", task_file(json.dumps({"clean": "a", "corrupt": "b"}) + "\n"),
         TaskError, r"lacks field\(s\) \['answer'\].*with the metric output:K, 'answer' is not needed"),
    Case("task: output:K accepts rows without an answer",
         task_file(json.dumps({"clean": "a", "corrupt": "b"}) + "\n", metric="output:0"), None),
    Case("task: output metric with a negative K", task_file(jsonl(), metric="output:-1"), MetricError,
         r"write output:K with K a non-negative integer"),
    Case("task: output metric with K not a number", task_file(jsonl(), metric="output:x"), MetricError,
         r"write output:K with K a non-negative integer"),
    Case("task: output:K wider than the model's output", task_file(jsonl(), prepare=True, metric="output:100000"),
         MetricError, r"output has \d+ dimensions .*choose K below"),
    Case("task: answer_pos past the prompt", task_file(jsonl(answer_pos=99), prepare=True), TaskError,
         r"answer_pos 99 is outside the clean prompt"),
    # model files
    Case("model: a .gguf that is not GGUF", model_file("m.gguf", b"<html>not found</html>" * 4), ModelLoadError,
         r"is not a GGUF file .*pass a \.gguf checkpoint"),
    Case("model: GGUF magic then garbage", model_file("m.gguf", b"GGUF" + b"\xff" * 40), ModelLoadError,
         r"header is damaged .*download it again"),
    Case("model: GGUF header then truncated metadata",
         model_file("m.gguf", GGUF_HEADER + struct.pack("<Q", 100) + b"gen"), ModelLoadError,
         r"could not convert GGUF file .*damaged or truncated .*download it again"),
    Case("model: HF dir, garbage model.safetensors",
         model_file("model.safetensors", b"\x93garbage" * 10, **{"config.json": HF_CONFIG}), ModelLoadError,
         r"not a valid safetensors file: .*fetch or save the model again"),
    Case("model: HF dir, truncated model.safetensors",
         model_file("model.safetensors", GOOD[:-5], **{"config.json": HF_CONFIG}), ModelLoadError,
         r"it is truncated: .*fetch or save the model again"),
    Case("model: HF dir, config.json not JSON",
         model_file("model.safetensors", GOOD, **{"config.json": b"{model_type: llama"}), ModelLoadError,
         r"config .* is not valid JSON .*fetch or save the model again"),
    Case("model: HF dir with pickled weights only",
         model_file("pytorch_model.bin", b"\x80\x04", **{"config.json": HF_CONFIG}), ModelLoadError,
         r"no \.safetensors weights.*safe_serialization=True"),
    Case("model: native dir, garbage model.safetensors",
         model_file("model.safetensors", b"\x93garbage" * 10, **{"native_config.json": NATIVE_CONFIG}),
         ModelLoadError, r"not a valid safetensors file: .*save_native"),
    Case("model: native dir, truncated model.safetensors",
         model_file("model.safetensors", GOOD[:-5], **{"native_config.json": NATIVE_CONFIG}), ModelLoadError,
         r"truncated: .*save_native"),
    Case("model: native_config.json not JSON",
         model_file("model.safetensors", GOOD, **{"native_config.json": b"n_layers: 1"}), ModelLoadError,
         r"native model config .* is not valid JSON .*save_native"),
    Case("model: native_config.json a list",
         model_file("model.safetensors", GOOD, **{"native_config.json": b"[1, 2]"}), ModelLoadError,
         r"must hold a JSON object, not a list"),
    Case("model: config.json neither HF nor TransformerLens",
         model_file("model.safetensors", GOOD, **{"config.json": b'{"hidden_size": 8}'}), ModelLoadError,
         r"neither an HF config \(it has no 'model_type' or 'architectures'\) nor a TransformerLens config "
         r"\(it lacks 'd_model' and 'n_layers'"),
    Case("model: TransformerLens config with parallel attention and MLP",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config(parallel_attn_mlp=True)}), ModelLoadError,
         r"TransformerLens config that circuitlab cannot build: parallel attention and MLP"),
    Case("model: TransformerLens config with ALiBi",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config(positional_embedding_type="alibi")}),
         ModelLoadError, r"positional_embedding_type 'alibi' \(supported: standard, rotary\)"),
    Case("model: TransformerLens config without d_head",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config(d_head=None)}), ModelLoadError,
         r"missing field 'd_head'"),
    Case("model: TransformerLens config with a text d_vocab",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config(d_vocab="5")}), ModelLoadError,
         r"field 'd_vocab' must be a positive integer, got '5'"),
    Case("model: TransformerLens config with an unknown act_fn",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config(act_fn="gelu_fast")}), ModelLoadError,
         r"act_fn 'gelu_fast' \(supported: "),
    Case("model: TransformerLens dir without weights", model_file("config.json", tl_config()), ModelLoadError,
         r"TransformerLens config.json but no model.safetensors"),
    Case("model: TransformerLens dir, garbage model.safetensors",
         model_file("model.safetensors", b"\x93garbage" * 10, **{"config.json": tl_config()}), ModelLoadError,
         r"not a valid safetensors file: .*save_native"),
    Case("model: TransformerLens dir, weights under unknown names",
         model_file("model.safetensors", GOOD, **{"config.json": tl_config()}), ModelLoadError,
         r"holds neither HookedTransformer keys \('embed.W_E'.*nor TransformerBridge state_dict keys"),
    # the cache
    Case("cache: truncated model.safetensors", cache_entry(_truncate), CacheError,
         r"cache entry .* is damaged: model.safetensors is .* bytes, the manifest says .*rebuilt on the next load"),
    Case("cache: model.safetensors changed, same size", cache_entry(_flip), CacheError,
         r"does not match its recorded sha256.*circuitlab cache clean --all"),
    Case("cache: garbage model.safetensors in a legacy entry", cache_entry(_garbage, legacy=True), CacheError,
         r"is damaged: model.safetensors: .*rebuilt on the next load"),
    # specs
    Case("spec: a local path that does not exist", spec("models/typo", chdir_with="models"), ModelLoadError,
         r"model path models/typo does not exist \(its directory models exists"),
    Case("spec: an absolute path that does not exist", spec("/no/such/dir/model"), ModelLoadError,
         r"model path /no/such/dir/model does not exist"),
    Case("spec: a hub id with HF_HUB_OFFLINE=1", spec("circuitlab-test/no-such-model", env={"HF_HUB_OFFLINE": "1"}),
         ModelLoadError, r"hub is unavailable \(HF_HUB_OFFLINE=1 is set\).*unset it, or pass a local model"),
    # port 9 (discard) on the loopback: refused at once, as an unreachable hub is
    Case("spec: a hub id without network", spec("circuitlab-test/no-such-model", env={"HF_ENDPOINT": "http://127.0.0.1:9"}),
         ModelLoadError, r"hub is unavailable \(cannot reach 127\.0\.0\.1:9.*check the network connection"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_circuitlab_error_naming_the_fix(case, tmp_path, monkeypatch, toy):
    monkeypatch.setenv("CIRCUITLAB_CACHE", str(tmp_path / "cache"))
    action = case.build(tmp_path, monkeypatch)
    start = time.perf_counter()
    if case.error is None:
        action(toy)
        return
    with pytest.raises(case.error, match=case.match) as caught:
        action(toy)
    assert isinstance(caught.value, CircuitlabError)
    if case.name.startswith("spec: a hub id"):
        # at once: no minute of download retries (the probe's own limit is 3 s)
        assert time.perf_counter() - start < loading.HUB_PROBE_TIMEOUT_S + 2


def test_bom_file_reads_its_first_field(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfclean,corrupt,answer,note\nMary gave a drink to,Tom gave a drink to, John,x\n")
    ex = load_task_file(path).examples[0]
    assert ex.clean == "Mary gave a drink to" and ex.meta == {"note": "x"}  # not "\ufeffclean" -> "lacks clean"
