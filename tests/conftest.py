"""Shared tiny fixtures: a BPE trained in-process, a tiny config, a checkpoint trained a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"

MINI_CORPUS = [
    "The cat sat on the mat. The dog ate 12 apples and 345 pears.",
    "고양이가 생선을 먹는다. 오늘은 날씨가 좋습니다. 감사합니다!",
    "def add(a, b):\n    return a + b\n\n# a comment with    spaces\t\ttabs",
    "Emoji are fine too: 🙂🚀 and mixed 한국어 English 2024 text.",
    "Mina lives in Velmora. She is a baker. Her favourite food is soup.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(MINI_CORPUS, vocab_size=400)


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def train_a_little(model: Transformer, tokenizer, steps: int = 30, lr: float = 3e-3) -> Transformer:
    """A few Adam steps on the mini corpus, so logits are not near-ties (DESIGN §6)."""
    torch.manual_seed(0)
    ids = []
    for text in MINI_CORPUS[:5]:
        ids += tokenizer.encode(text, add_bos=True) + [tokenizer.eos_id]
    data = torch.tensor(ids)
    T = min(32, model.cfg.max_seq_len - 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (8,))
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).view(-1, model.cfg.vocab_size), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_checkpoint(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    directory = tmp_path_factory.mktemp("ckpt") / "trained"
    save_checkpoint(directory, model, tokenizer, lineage={"stage": "test"})
    return directory


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """One `lmforge run --quick` per test session; every slow test reuses its checkpoints.

    Set LMFORGE_QUICK_RUN to a directory to reuse a run across sessions (it is resumed, so a finished run
    costs only its evaluation)."""
    import os
    import time

    from lmforge.cli import main

    out = Path(os.environ.get("LMFORGE_QUICK_RUN") or tmp_path_factory.mktemp("quick") / "run")
    start = time.perf_counter()
    assert main(["run", "--quick", "--out", str(out), "--no-progress"]) == 0
    (out / "test_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}")
    return out
