"""Pretraining: next-token prediction on a text corpus, the first stage of every foundation model.

The model learns P(w_i | w_<i) by minimising the cross-entropy of every next token in random windows of the
corpus (GPT-3's objective). This module is its config, its batches and its loss; the loop is `train/loop.py`.

    lmforge pretrain --data corpus.jsonl --preset micro --out runs/mine
    lmforge pretrain --data cc.jsonl webtext.jsonl --weights 60 22 --preset micro --out runs/mix
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.data.corpus import Source, TokenCorpus, build_token_shards, mixture_weights, read_documents
from lmforge.errors import BadConfigError
from lmforge.model import Transformer, flops_per_token, get_preset
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loop import TrainConfig, micro_batch_count, train, world_info


@dataclass(frozen=True)
class PretrainConfig:
    data: tuple[str, ...] = ()
    """Training text: .txt files, .jsonl files (see --text-field), directories of them."""
    weights: tuple[float, ...] = ()
    """Mixture weight of each --data source (renormalised); default: equal."""
    valid_data: tuple[str, ...] = ()
    """Validation text; default: a held-out 2% of the training documents."""
    text_field: str = "text"
    tokenizer: str = ""
    """Directory with a tokenizer.json; default: train a byte-level BPE on --data."""
    vocab_size: int = 1024
    """Vocabulary size of a newly trained tokenizer."""
    preset: str = "micro"
    """Model size (see `lmforge info --preset NAME`)."""
    seq_len: int = 0
    """Training window in tokens; 0: the preset's context length."""
    out: str = "runs/pretrain"
    train: TrainConfig = field(default_factory=TrainConfig)


def next_token_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy of each next token. batch = (inputs, targets), both (B, T)."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
    return loss, {"n_tokens": targets.numel()}


@torch.no_grad()
def validation_loss(model, corpus: TokenCorpus, seq_len: int, max_windows: int = 32, batch_size: int = 8) -> float:
    """Mean next-token loss over the first `max_windows` validation windows of each source."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, targets in corpus.valid_windows(seq_len, max_windows=max_windows, batch_size=batch_size):
        logits = model(inputs.to(device)).float()
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), targets.to(device).view(-1), reduction="sum").item()
        count += targets.numel()
    return total / count if count else float("nan")


def prepare_tokenizer(cfg: PretrainConfig, sources: list[Source], out: Path) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if (out / "tokenizer" / "tokenizer.json").is_file():
        return Tokenizer.load(out / "tokenizer")
    texts = (doc for s in sources for doc in read_documents(s.path, s.text_field))
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    return tokenizer


def prepare_corpus(sources, valid_sources, tokenizer: Tokenizer, directory: Path, seed: int) -> TokenCorpus:
    """Tokenize into shards once; reuse them while the sources and tokenizer are the same."""
    info = directory / "corpus.json"
    wanted = {"sources": [asdict(s) for s in sources], "valid": [asdict(s) for s in valid_sources or []],
              "fingerprint": tokenizer.fingerprint(), "seed": seed}
    stamp = directory.parent / "corpus_stamp.json"
    if not (info.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        build_token_shards(sources, tokenizer, directory, valid_sources=valid_sources or None, seed=seed)
        stamp.write_text(json.dumps(wanted))
    return TokenCorpus.open(directory, tokenizer)


def make_sources(paths, weights, text_field: str) -> list[Source]:
    if weights and len(weights) != len(paths):
        raise BadConfigError(f"--weights has {len(weights)} values for {len(paths)} --data sources")
    return [Source(path=p, weight=weights[i] if weights else 1.0, text_field=text_field) for i, p in enumerate(paths)]


def pretrain(cfg: PretrainConfig, lineage: dict | None = None) -> Path:
    """Tokenizer + corpus + preset -> checkpoint at OUT/final. Returns that directory."""
    if not cfg.data:
        raise BadConfigError("--data: give at least one training file or directory")
    out = Path(cfg.out)
    sources = make_sources(cfg.data, cfg.weights, cfg.text_field)
    valid_sources = make_sources(cfg.valid_data, (), cfg.text_field) if cfg.valid_data else []

    mixture_weights(sources)  # a bad weight fails here, before anything is written

    # --- tokenizer and token shards (a failure here leaves no half-made output directory) ----------------
    # Rank 0 prepares; under torchrun the other ranks wait, then open what it wrote.
    rank, world_size = world_info()
    if rank == 0:
        created = not out.exists()
        try:
            tokenizer = prepare_tokenizer(cfg, sources, out)
            corpus = prepare_corpus(sources, valid_sources, tokenizer, out / "data", cfg.train.seed)
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    if world_size > 1:
        torch.distributed.barrier()
    if rank != 0:
        tokenizer = Tokenizer.load(cfg.tokenizer or out / "tokenizer")
        corpus = TokenCorpus.open(out / "data", tokenizer)

    # --- model ------------------------------------------------------------------------------------------
    preset = get_preset(cfg.preset)
    seq_len = cfg.seq_len or preset.max_seq_len
    model_cfg = replace(preset, vocab_size=tokenizer.vocab_size, max_seq_len=max(seq_len, preset.max_seq_len))
    torch.manual_seed(cfg.train.seed)
    model = Transformer(model_cfg)

    # --- batches: this rank's rows of the global batch, cut into micro-batches ---------------------------
    micro_size, n_micro = micro_batch_count(cfg.train, world_size)
    per_rank = micro_size * n_micro

    def get_micro_batches(step: int):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        inputs, targets = corpus.train_batch(step, cfg.train.batch_size, seq_len, cfg.train.seed, rows=rows)
        return [(inputs[i:i + micro_size], targets[i:i + micro_size]) for i in range(0, per_rank, micro_size)]

    save = partial(save_checkpoint, tokenizer=tokenizer, configs={"pretrain": asdict(cfg)},
                   lineage=lineage or {"stage": "pretrain", "parent": None})
    train(
        model, get_micro_batches, next_token_loss, cfg.train, out, save=save,
        evaluate=lambda m: {"val_loss": validation_loss(m, corpus, seq_len)},
        flops_per_token=flops_per_token(model_cfg, seq_len),
    )
    return out / "final"
