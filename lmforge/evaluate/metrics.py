"""Text metrics: answer matching, n-gram overlap, embedding similarity and reference-free quality.

Each metric is a plain function of strings (and, for the model-based ones, a model); corpus aggregation is the
caller's mean unless the metric defines its own (corpus BLEU). Definitions follow evaluation.md §12:

- **exact match / token F1**: the SQuAD v1.1 evaluation script's, on SQuAD-normalised answers;
- **BLEU**: sacrebleu (0-100 scale, its default `13a` tokenizer, no lowercasing), corpus and sentence level;
- **ROUGE-L**: rouge-score's LCS F-measure; its tokenizer keeps only [a-z0-9] runs, so Korean text falls back
  to character tokens (see `rouge_l`);
- **embedding cosine**: mean-pooled final hidden states of a causal LM (native or `transformers`), or a local
  sentence-transformers directory; nothing is downloaded;
- **reference-free**: distinct-n (diversity across samples), repetition rate (degeneration within a text),
  perplexity under a reference model (`evaluate/perplexity.py`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.perplexity import perplexity

# --- answer matching (SQuAD) ---------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)  # ASCII only, as in SQuAD's script: "“" and "。" are kept
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation, in its order: lowercase, delete ASCII punctuation, delete the English articles
    a/an/the as whole words, collapse whitespace. "The Cat's  mat!" -> "cats mat". Korean text passes through
    apart from lowercasing and whitespace (its particles are not split off: see `token_f1(char_level=True)`)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise BadConfigError("at least one reference is needed")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if normalize_answer(prediction) == normalize_answer(reference) for any reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_list(references)))


def token_f1(prediction: str, references: str | Sequence[str], char_level: bool = False) -> float:
    """SQuAD token F1, the best over references. With p, r the normalised tokens of prediction and reference
    and common = |multiset(p) ∩ multiset(r)|:

        precision = common / |p|,  recall = common / |r|,  F1 = 2 · precision · recall / (precision + recall)

    (0 when common = 0; when either side normalises to nothing, 1 if both do, else 0, as in SQuAD v2).
    Tokens are whitespace words; `char_level=True` uses the characters of those words instead, as KorQuAD's
    official script does: Korean words carry particles ("고양이가" vs "고양이는"), so word F1 is too harsh."""
    def tokens(text: str) -> list[str]:
        words = normalize_answer(text).split()
        return [ch for w in words for ch in w] if char_level else words

    best = 0.0
    pred = tokens(prediction)
    for ref in _as_list(references):
        gold = tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --- n-gram overlap: BLEU (sacrebleu) and ROUGE-L (rouge-score) ------------------------------------------------

def _reference_streams(references: Sequence[str | Sequence[str]], n_hypotheses: int) -> list[list[str]]:
    """Per-hypothesis references -> sacrebleu's layout, one stream per reference position."""
    per_item = [_as_list(r) for r in references]
    if len(per_item) != n_hypotheses:
        raise BadConfigError(f"{n_hypotheses} hypotheses but {len(per_item)} references")
    if len({len(r) for r in per_item}) > 1:
        raise BadConfigError("every hypothesis needs the same number of references for corpus BLEU")
    return [list(stream) for stream in zip(*per_item)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = "13a") -> float:
    """Corpus BLEU (Papineni et al. 2002) through sacrebleu, on its 0-100 scale; references[i] is the reference
    (or list of references) of hypotheses[i]. With p_n the modified n-gram precisions pooled over the corpus,
    c the hypothesis length and r the closest reference length, both summed over the corpus:

        BLEU = 100 · BP · exp(mean_{n=1..4} log p_n),   BP = 1 if c > r else exp(1 − r/c)

    sacrebleu's default tokenizer `13a` (mteval-v13a: splits punctuation from words, keeps case) is used; pass
    `tokenize="char"` or, with MeCab installed, "ko-mecab" for Korean. Corpus BLEU is not the mean of sentence
    BLEUs."""
    streams = _reference_streams(references, len(hypotheses))
    return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize).score


def sentence_bleu(hypothesis: str, references: str | Sequence[str], tokenize: str = "13a") -> float:
    """BLEU of one sentence (0-100), the corpus formula over one pair. sacrebleu smooths a zero n-gram count
    (method "exp": the k-th zero precision becomes 1 / 2^k) and uses the effective order, so a short sentence
    without 4-grams is not scored 0. Meant for per-sample diagnostics, not for reporting a system's BLEU."""
    return sacrebleu.sentence_bleu(hypothesis, _as_list(references), tokenize=tokenize).score


class _CharTokenizer:
    """Word characters (letters, digits, Hangul syllables) one per token, lowercased; spaces and punctuation
    dropped. rouge-score accepts any object with `tokenize(text) -> list[str]`."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[^\W_]", text.lower())


_HANGUL_OR_CJK = re.compile(r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u9fff\uac00-\ud7af]")
_SCORERS = {
    "english": rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False),
    "char": rouge_scorer.RougeScorer(["rougeL"], tokenizer=_CharTokenizer()),
}


def rouge_l(prediction: str, references: str | Sequence[str], tokenize: str = "auto") -> float:
    """ROUGE-L F-measure (Lin 2004) through rouge-score, the best over references. With LCS the longest common
    subsequence of the token lists, m = |prediction|, n = |reference|:

        P = LCS / m,  R = LCS / n,  F = 2PR / (P + R)

    e.g. "a b c d" against "a c e": LCS = 2 ("a c"), P = 1/2, R = 2/3, F = 4/7.

    Tokenisation: "english" is rouge-score's own (lowercase, every run of [a-z0-9] a token, no stemming), which
    turns Korean text into *no tokens at all* (F = 0 whatever the text). "char" makes every letter, digit or
    Hangul syllable a token. "auto" (default) picks "char" when the reference contains Hangul, kana or CJK
    ideographs, else "english". Character-level and word-level scores are on different scales: compare systems
    only on the same references (then "auto" chooses the same way for each system)."""
    refs = _as_list(references)
    if tokenize == "auto":
        tokenize = "char" if any(_HANGUL_OR_CJK.search(r) for r in refs) else "english"
    if tokenize not in _SCORERS:
        raise BadConfigError(f"tokenize must be 'auto', 'english' or 'char', got {tokenize!r}")
    return max(_SCORERS[tokenize].score(ref, prediction)["rougeL"].fmeasure for ref in refs)


# --- embedding similarity ----------------------------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask[b, t] · hidden[b, t] / sum_t mask[b, t]: the mean of each row's unmasked vectors, (B, T, d) ->
    (B, d). A row with no unmasked position gives zeros."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states the output head reads, (B, T, d): after the last block and the final norm.

    Native `Transformer` (and a Llama-family import): captured with a forward hook on `model.norm`, so this is
    exactly the model's own forward, not a copy of it. Rows must be right-padded: attention is causal, so a real
    token never sees the pads after it and `attention_mask` is not needed. A `transformers` model behind
    `HFCausalLM`: `hidden_states[-1]` (the final-norm output for Llama and GPT-2), with the mask passed on."""
    hf_model = getattr(model, "hf_model", None)
    if hf_model is not None:
        out = hf_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]
    if not isinstance(getattr(model, "norm", None), torch.nn.Module):
        raise BadConfigError(f"{type(model).__name__}: no final `norm` to read hidden states from")
    captured = []
    handle = model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids)
    finally:
        handle.remove()
    return captured[-1]


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings (N, d), float32 on the CPU: each text is encoded after BOS, right-padded, run through
    the model, and its final hidden states (`final_hidden_states`) are mean-pooled over the text's own tokens
    (BOS and pads excluded; an empty text keeps its BOS state). Texts longer than the context lose their end."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [[tokenizer.bos_id, *tokenizer.encode(t)][:max_len] for t in texts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)  # (B, T)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        pool_mask = attention_mask.clone()
        pool_mask[:, 0] = torch.tensor([len(r) == 1 for r in rows], device=device)  # BOS only for empty texts
        hidden = final_hidden_states(model, input_ids, attention_mask).float()  # (B, T, d)
        out.append(mean_pool(hidden, pool_mask).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Callable[[Sequence[str]], torch.Tensor]:
    """texts -> embeddings (N, d) from a local directory, never downloading: a sentence-transformers directory
    (it has `modules.json`; needs `sentence_transformers` installed) is used as trained, with its own pooling;
    any other checkpoint goes through `hf.load_model` (lmforge or `transformers` causal LM) and `embed_texts`."""
    from lmforge.hf import load_model

    path = Path(path)
    if not path.is_dir():
        raise BadFileError(f"{path}: not a local model directory (nothing is downloaded)")
    if (path / "modules.json").is_file():
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise BadFileError(f"{path}: a sentence-transformers model needs "
                               "`pip install sentence-transformers`") from None
        encoder = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        return lambda texts: encoder.encode(list(texts), convert_to_tensor=True).float().cpu()
    model, tokenizer = load_model(path, device=device)
    return lambda texts: embed_texts(model, tokenizer, texts)


def embedding_cosine(predictions: Sequence[str], references: Sequence[str],
                     encode: Callable[[Sequence[str]], torch.Tensor]) -> list[float]:
    """cos(e(a), e(b)) = e(a)·e(b) / (|e(a)| |e(b)|) for each (prediction, reference) pair, with `encode` from
    `load_encoder` (or `lambda t: embed_texts(model, tokenizer, t)`). Raw cosines of a causal LM's states are
    all high (anisotropy): compare them against each other, not against a fixed threshold."""
    if len(predictions) != len(references):
        raise BadConfigError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return []
    e = encode([*predictions, *references])
    return F.cosine_similarity(e[:len(predictions)], e[len(predictions):], dim=-1).tolist()


# --- reference-free quality --------------------------------------------------------------------------------------

def _word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over `texts` (0 when there are none). Words are whitespace-split
    and case-sensitive. Across samples for one prompt it measures diversity (Li et al. 2016)."""
    grams = [g for t in texts for g in _word_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int) -> float:
    """The share of a text's word n-gram occurrences that repeat an n-gram seen earlier in the same text:

        rep-n = 1 − |unique n-grams| / |n-gram occurrences|   (0 when the text has fewer than n words)

    Welleck et al. 2019's seq-rep-n; degenerate loops push it towards 1. Words as in `distinct_n` (it is
    1 − distinct_n([text], n)). "the cat the cat the cat", n = 2: 5 bigrams, 2 unique -> 3/5."""
    grams = _word_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def text_perplexity(model, tokenizer, text: str, max_length: int | None = None) -> float:
    """Token perplexity of one text under a reference model, exp(−(1/N) Σ_i log P(t_i | BOS, t_<i)), scored as
    `evaluate.perplexity.perplexity` scores a corpus (disjoint rolling windows past the context). Token
    perplexities are only comparable under one tokenizer: use one reference model for all systems."""
    return perplexity(model, tokenizer, [text], max_length)["perplexity"]
