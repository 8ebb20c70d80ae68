"""`Model`: a TransformerLens `TransformerBridge` plus tokenizer helpers under one BOS policy.

BOS policy (the same everywhere in circuitlab): every prompt is encoded with the tokenizer's own special
tokens turned off and the model's BOS token id prepended, if the tokenizer defines one. This equals the
bridge's default `to_tokens` for SmolLM2 (whose tokenizer adds no BOS itself) and Gemma (whose tokenizer
does), so positions mean the same in every analysis. Token position 0 is always BOS when one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int

from circuitlab.errors import TokenizationError


@dataclass
class Model:
    """A loaded model. `bridge` is the TransformerBridge (hooks, run_with_cache, run_with_hooks)."""

    bridge: Any
    tokenizer: Any | None
    spec: str
    source: str = ""
    load_s: float = 0.0
    extra: dict = field(default_factory=dict)

    # --- shape ---------------------------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def d_vocab(self) -> int:
        """Input vocabulary size: token ids run from 0 to d_vocab - 1."""
        return int(self.cfg.d_vocab)

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits (the output vocabulary), read from the unembedding the forward uses.

        Usually d_vocab; compiled models often have fewer outputs than inputs, and a regression model one.
        """
        unembed = getattr(self.bridge, "unembed", None)
        weight = getattr(unembed, "W_U", None) if unembed is not None else None
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[-1])
        width = int(getattr(self.cfg, "d_vocab_out", -1) or -1)
        return width if width > 0 else self.d_vocab

    @property
    def attn_only(self) -> bool:
        return bool(getattr(self.cfg, "attn_only", False))

    def info(self) -> dict:
        """Plain-data description recorded in every results.json."""
        return {
            "spec": self.spec,
            "source": self.source,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
            "d_vocab_out": self.d_vocab_out,
            "n_ctx": self.n_ctx,
            "bos_token_id": self.bos_token_id,
        }

    # --- tokenizer helpers ---------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.bos_token_id

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TokenizationError(
                f"model {self.spec!r} has no tokenizer; pass token ids instead of text, or load the model "
                "with a tokenizer (circuitlab.models.toy.word_tokenizer builds one for toy models)"
            )
        return self.tokenizer

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text` under the BOS policy (BOS first when `bos` and the model has one)."""
        ids = list(self._require_tokenizer()(text, add_special_tokens=False)["input_ids"])
        if bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def to_tokens(self, texts: str | list[str], *, bos: bool = True) -> Int[torch.Tensor, "batch pos"]:
        """Encode one prompt or a list of prompts of equal token length into a [batch, pos] tensor."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise TokenizationError("to_tokens got an empty list of prompts; pass at least one prompt")
        rows = [self.encode(t, bos=bos) for t in texts]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            first = rows[0]
            other = next(r for r in rows if len(r) != len(first))
            raise TokenizationError(
                "prompts have different token lengths "
                f"({len(first)} for {texts[rows.index(first)]!r} = {self.str_tokens(first)}, "
                f"{len(other)} for {texts[rows.index(other)]!r} = {self.str_tokens(other)}); "
                "group prompts by length (Task does this) or make them the same length"
            )
        return torch.tensor(rows, dtype=torch.long)

    def str_tokens(self, ids: list[int] | torch.Tensor) -> list[str]:
        """Readable text of each token id (for plots, reports and error messages)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._require_tokenizer().decode(ids)

    def is_single_token(self, text: str) -> bool:
        return len(self.encode(text, bos=False)) == 1

    def single_token_id(self, text: str) -> int:
        """The id of `text` when it is exactly one token; a clear error naming the split otherwise."""
        ids = self.encode(text, bos=False)
        if len(ids) != 1:
            pieces = self.str_tokens(ids)
            hint = " (note the leading space: answers usually need one, e.g. ' Mary')" if not text.startswith(" ") else ""
            raise TokenizationError(
                f"{text!r} is {len(ids)} tokens {pieces} in {self.spec}'s tokenizer, but a single token is "
                f"required here{hint}; choose an answer that is one token"
            )
        return ids[0]

    # --- running -------------------------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Early, readable errors for token tensors the model cannot run."""
        if tokens.ndim != 2:
            raise TokenizationError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.n_ctx:
            raise TokenizationError(
                f"prompt is {tokens.shape[1]} tokens but {self.spec} has a context of {self.n_ctx}; shorten it"
            )
        if tokens.numel() and (int(tokens.max()) >= self.d_vocab or int(tokens.min()) < 0):
            raise TokenizationError(f"token ids must lie in [0, {self.d_vocab}); got {int(tokens.max())}")

    def logits(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos vocab"]:
        """Plain forward pass through the bridge."""
        self.check_tokens(tokens)
        return self.bridge(tokens, return_type="logits")
