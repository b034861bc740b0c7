"""Perplexity, as the lecture defines it: PPL = (prod_i 1 / P(w_i | w_<i)) ^ (1/N), i.e. exp(mean NLL).

The product of N probabilities underflows, so it is computed in logs: exp(-(1/N) * sum_i log P(w_i | w_<i)).
Aggregation is corpus-level (total log-likelihood over total units, lm-eval's convention), and each text is
scored on its own with the disjoint rolling windows of `infer/scoring.py`, so a text longer than the
context has every token scored exactly once.

Token perplexity depends on the tokenizer; bits per byte (-sum log P / bytes / ln 2) and word perplexity
compare models with different tokenizers.

    lmforge eval perplexity --model runs/world/pretrain/final --data runs/world/world/corpus/valid.jsonl
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.data.corpus import read_documents
from lmforge.errors import BadFileError
from lmforge.infer.scoring import loglikelihood_rolling
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityConfig:
    model: str
    """Checkpoint directory."""
    data: str
    """Text to score: .txt (one document per file) or .jsonl (see --text-field)."""
    text_field: str = "text"
    max_length: int = 0
    """Window length in tokens; 0: the model's context."""
    limit: int = 0
    """Score only the first N documents (0: all)."""
    out: str = ""
    """Also write the results as JSON here."""
    device: str = "auto"


def summarize(loglikelihood: float, n_tokens: int, n_bytes: int, n_words: int) -> dict:
    return {
        "perplexity": math.exp(-loglikelihood / n_tokens),
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
        "word_perplexity": math.exp(-loglikelihood / n_words),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "n_tokens": n_tokens, "n_bytes": n_bytes, "n_words": n_words, "loglikelihood": loglikelihood,
    }


def _units(text: str) -> tuple[int, int]:
    return len(text.encode("utf-8")), len(re.split(r"\s+", text))


def perplexity(model, tokenizer: Tokenizer, texts: list[str], max_length: int | None = None) -> dict:
    """Corpus-level perplexity of `texts`; each text is conditioned on BOS and scored token by token."""
    max_length = max_length or model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    total, n_tokens, n_bytes, n_words = 0.0, 0, 0, 0
    for text in texts:
        ll, scored = loglikelihood_rolling(model, tokenizer.encode(text), max_length, tokenizer.bos_id)
        b, w = _units(text)
        total, n_tokens, n_bytes, n_words = total + ll, n_tokens + scored, n_bytes + b, n_words + w
    model.train(was_training)
    if n_tokens == 0:
        raise BadFileError("nothing to score: every text is empty")
    return summarize(total, n_tokens, n_bytes, n_words)


def unigram_perplexity(train_texts, texts: list[str], tokenizer: Tokenizer) -> dict:
    """The baseline a language model must beat: P(w_i) from token counts of the training text (add-one
    smoothed over the vocabulary), ignoring all context. Scored on the same tokens as `perplexity`."""
    counts: Counter[int] = Counter()
    for text in train_texts:
        counts.update(tokenizer.encode(text))
    denom = sum(counts.values()) + tokenizer.vocab_size
    total, n_tokens, n_bytes, n_words = 0.0, 0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        total += sum(math.log((counts[i] + 1) / denom) for i in ids)
        b, w = _units(text)
        n_tokens, n_bytes, n_words = n_tokens + len(ids), n_bytes + b, n_words + w
    return summarize(total, n_tokens, n_bytes, n_words)


def run(cfg: PerplexityConfig) -> dict:
    from lmforge.train.loop import pick_device

    model, tokenizer, _ = load_checkpoint(cfg.model, device=pick_device(cfg.device))
    if not Path(cfg.data).exists():
        raise BadFileError(f"{cfg.data}: no such file")
    texts = []
    for text in read_documents(cfg.data, cfg.text_field):
        texts.append(text)
        if cfg.limit and len(texts) >= cfg.limit:
            break
    with torch.no_grad():
        result = perplexity(model, tokenizer, texts, cfg.max_length or None)
    result.update(model=cfg.model, data=cfg.data, n_documents=len(texts))
    text = json.dumps(result, indent=2)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cfg.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(cfg.out)
    print(text)
    return result
