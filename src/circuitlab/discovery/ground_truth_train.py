"""Train the ``trained-induction`` ground-truth model: a 2-layer attention-only transformer that learns
induction on repeated random tokens. Seeded and single-threaded, so a run is reproducible::

    python -m circuitlab.discovery.ground_truth_train --out DIR

writes DIR/config.json + DIR/model.safetensors (a TransformerLens-format model directory that
`load_model(DIR)` reads), DIR/true_circuit.json (the true edge set found by
`ground_truth.derive_true_edges`) and DIR/training.json (settings, losses, head scores). The shipped copy
lives in ``circuitlab/discovery/data/trained_induction`` and was written by this command with its defaults.

Training data: rows of N_CTX tokens, BOS then random tokens from 1..D_VOCAB-1, in which a random segment x
of 4 to 10 tokens is repeated right after itself at a random offset. The loss counts only the positions
whose next token the repeat determines (the second copy, after its first token): this makes induction
form in a few hundred steps, where the plain next-token loss on every position needs thousands (most
positions are unpredictable noise). The model is therefore uncalibrated on unrepeated text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Int

from circuitlab.discovery.ground_truth import (
    BOS,
    TRAINED,
    TRUTH_FILE,
    attention_patterns,
    bridge_from_plain,
    derive_true_edges,
    induction_scores,
    previous_token_scores,
    repeated_tokens_task,
    write_truth,
)
from circuitlab.models.model import Model

D_VOCAB = 32
N_CTX = 24
IGNORE = -100  # cross_entropy's ignore_index: positions the loss does not count


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 400
    batch: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.01
    min_repeat: int = 4
    max_repeat: int = 10


def trained_config(seed: int = 0) -> dict:
    """Attention-only, 2 layers x 4 heads of 8 dims, d_model 32, no norms, learned absolute positions."""
    return dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=D_VOCAB, n_ctx=N_CTX, attn_only=True,
                normalization_type=None, positional_embedding_type="standard", act_fn="gelu", seed=seed)


def training_batch(settings: TrainSettings, generator: torch.Generator) -> tuple[Int[torch.Tensor, "batch pos"],
                                                                               Int[torch.Tensor, "batch pos_1"]]:
    """Tokens [batch, N_CTX] with one repeated segment per row, and next-token targets (IGNORE elsewhere)."""
    n = settings.batch
    tokens = torch.randint(1, D_VOCAB, (n, N_CTX), generator=generator)
    tokens[:, 0] = BOS
    length = torch.randint(settings.min_repeat, settings.max_repeat + 1, (n, 1), generator=generator)
    start = 1 + (torch.rand(n, 1, generator=generator) * (N_CTX - 2 * length)).long()  # first copy
    pos = torch.arange(N_CTX)[None]
    second = (pos >= start + length) & (pos < start + 2 * length)
    tokens = torch.where(second, tokens.gather(1, (pos - length).clamp(min=0)), tokens)
    # the prediction at p is scored when both p and p + 1 lie in the second copy
    predictable = second[:, 1:] & second[:, :-1]
    targets = torch.where(predictable, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE))
    return tokens, targets


def train(settings: TrainSettings = TrainSettings()) -> tuple[Model, list[float]]:
    """Train on one CPU thread (restored afterwards); returns the model and the loss every 50 steps."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native.init import initialize_native_model
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float summation order on every run
    try:
        config = trained_config(settings.seed)
        bridge_cfg = TransformerBridgeConfig.from_dict(config)
        torch.manual_seed(settings.seed)
        plain = NativeModel(bridge_cfg)
        initialize_native_model(plain, bridge_cfg)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        generator = torch.Generator().manual_seed(settings.seed)
        losses = []
        plain.train()
        for step in range(settings.steps):
            tokens, targets = training_batch(settings, generator)
            logits = plain(tokens)[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, D_VOCAB), targets.reshape(-1), ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == settings.steps - 1:
                losses.append(round(loss.item(), 4))
        plain.eval()
    finally:
        torch.set_num_threads(threads)
    return bridge_from_plain(plain, config, name=TRAINED), losses


def induction_losses(model: Model, *, n: int = 64, seed: int = 1) -> dict[str, float]:
    """Mean next-token loss (nats) on BOS + x + x over the first copy (unpredictable) and over the second
    copy after its first token (predictable by induction)."""
    task = repeated_tokens_task(model.d_vocab, n=n, seed=seed)
    seq_len = int(task.params["seq_len"])
    tokens = torch.tensor([ex.clean_ids for ex in task.examples])
    with torch.no_grad():
        logprobs = torch.log_softmax(model.logits(tokens), -1)
    nll = -logprobs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # nll[:, p] predicts token p + 1
    return {"first_copy": float(nll[:, :seq_len].mean()), "second_copy": float(nll[:, seq_len + 1:].mean())}


def write_trained(out: str | Path, settings: TrainSettings = TrainSettings()) -> Path:
    """Train and write the model directory, its true circuit and training.json."""
    from circuitlab.models.loading import save_native

    start = time.perf_counter()
    model, losses = train(settings)
    seconds = time.perf_counter() - start
    out = Path(out)
    save_native(model, out, trained_config(settings.seed))
    task = repeated_tokens_task(model.d_vocab)
    edges = derive_true_edges(model, task)
    write_truth(model, edges, out / TRUTH_FILE)
    patterns = attention_patterns(model, torch.tensor([ex.clean_ids for ex in task.examples]))
    record = {
        "settings": asdict(settings), "torch": torch.__version__, "train_seconds": round(seconds, 1),
        "losses_every_50_steps": losses, "induction_losses": induction_losses(model),
        "previous_token_scores": previous_token_scores(patterns).round(decimals=4).tolist(),
        "induction_scores": induction_scores(patterns, int(task.params["seq_len"])).round(decimals=4).tolist(),
        "true_edges": edges,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuitlab.discovery.ground_truth_train",
                                     description="Train the trained-induction ground-truth model.")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    args = parser.parse_args(argv)
    out = write_trained(args.out, TrainSettings(seed=args.seed, steps=args.steps))
    record = json.loads((out / "training.json").read_text())
    print(f"wrote {out} in {record['train_seconds']} s: induction losses {record['induction_losses']}, "
          f"true edges {record['true_edges']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
