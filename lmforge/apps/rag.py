"""Retrieval-augmented generation: find passages for a question, put them in the prompt, cite what was used.

    lmforge rag index docs.jsonl --out runs/index [--encoder runs/world/pretrain/final]
    lmforge rag ask --model runs/world/sft/final --index runs/index --question "Where was Mina Velk born?"

- **Passages** come from a JSONL file of `{"text", "id"?, "title"?}` records (a title is prefixed to its text)
  or a plain-text file whose blank-line-separated paragraphs are the passages.
- **BM25** (Robertson and Zaragoza 2009, Lucene's variant, `bm25s`'s default; applications.md §4):
  idf(t) = ln(1 + (N - df_t + 0.5) / (df_t + 0.5)), score(q, d) = Σ_{t in q} idf(t) · tf / (tf + k1 (1 - b + b
  |d| / avgdl)), k1 = 1.5, b = 0.75, summed over the query's tokens as a bag (a repeated word counts again, as
  in `bm25s` and Lucene). Tokens: lower case, runs of two or more word characters, Lucene's English stopwords
  dropped, no stemming. Written out with numpy and a scipy sparse matrix (the scores match `bm25s` to 1e-6,
  tests/test_rag.py); its statistics are rebuilt when an index loads, milliseconds for thousands of passages.
- **Dense**: any `encode(texts) -> (N, d)` function; passages and query are compared by cosine. The command
  line uses `lmforge.evaluate.metrics.load_encoder`: a local sentence-transformers directory as trained, or
  the mean-pooled final hidden states of a causal LM (our own checkpoints included). Passage embeddings are
  the expensive part and are stored in the index (`embeddings.npy`).
- **Hybrid**: reciprocal-rank fusion (Cormack et al. 2009) of the two rankings, score(d) = Σ_lists 1 / (60 +
  rank(d)) with 1-based ranks over each list's top `FUSION_DEPTH`. RRF needs no score calibration: BM25 scores
  are unbounded, cosines of a causal LM's states all sit near 1.
- **Prompt** (`build_prompt`): the question, then the passages numbered [1], [2], ... (`RAG_TEMPLATE`), as
  many of the top passages as fit the context with room left for the answer; a first passage that alone does
  not fit loses its last words.
- **Citations** (`parse_citations`): [n] markers in the answer name the passages used. An answer without
  them is given the passages that contain it (`cited_by: "attached"`); one that no passage contains cites
  nothing (`cited_by: "none"`), which is itself a warning sign.
- **Faithfulness** (`judge_answer`): every answer gets one of four outcomes against the true value and the
  retrieved text, a lexical judge (no model): correct, hallucinated (a claimed value that is neither true nor
  in the passages), misread (wrong, but every claimed value is in the passages), abstained. `recall_at_k` and
  `mean_reciprocal_rank` measure the retriever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Sequence

import numpy as np
import tyro

from lmforge.data.world_tasks import normalize
from lmforge.errors import BadConfigError, BadFileError

# Lucene's English stopword list, the one `bm25s.tokenize(..., stopwords="en")` uses.
STOPWORDS = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then "
                      "there these they this to was will with".split())
TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
FUSION_K = 60  # RRF's constant: 60 in Cormack et al., and nearly everywhere since
FUSION_DEPTH = 100  # each retriever's top passages that enter the fusion
METHODS = ("bm25", "dense", "hybrid")
RAG_TEMPLATE = "{question} Answer from the passages and cite one.\n\n{passages}"
CITATION_RE = re.compile(r"\s*\[(\d+)\]")
ABSTAIN_RE = re.compile(r"\b(?:do(?:es)? not say|don't say|do not know|don't know|not in the passages|cannot tell|"
                        r"can't tell|not possible to tell|no answer|i can't|i cannot|sorry)\b", re.I)
OUTCOMES = ("correct", "hallucinated", "misread", "abstained")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Retrieval


def bm25_tokens(text: str) -> list[str]:
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


class BM25:
    """Okapi BM25 over pre-tokenised documents, Lucene's idf (see the module docstring). Each (document, term)
    contribution idf · tf / (tf + k1 (1 - b + b |d| / avgdl)) is computed once into a sparse (N, V) matrix, so a
    query's scores are the sum of its terms' columns."""

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75):
        from scipy.sparse import csc_matrix

        self.vocab: dict[str, int] = {}
        rows, cols, counts = [], [], []
        for d, tokens in enumerate(documents):
            for token, count in Counter(tokens).items():
                rows.append(d)
                cols.append(self.vocab.setdefault(token, len(self.vocab)))
                counts.append(count)
        rows, cols, tf = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(counts, dtype=float)
        n_docs = len(documents)
        doc_len = np.array([len(t) for t in documents], dtype=float)
        df = np.bincount(cols, minlength=len(self.vocab))  # (V,): rows hold each (document, term) once
        self.idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))  # (V,)
        norm = k1 * (1 - b + b * doc_len / max(doc_len.mean() if n_docs else 0.0, 1e-9))  # (N,)
        self.weights = csc_matrix((self.idf[cols] * tf / (tf + norm[rows]), (rows, cols)),
                                  shape=(n_docs, len(self.vocab)))  # (N, V)

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """(N,) scores; a repeated query word counts again, an unknown one adds nothing."""
        columns = [self.vocab[t] for t in query_tokens if t in self.vocab]
        if not columns:
            return np.zeros(self.weights.shape[0])
        return np.asarray(self.weights[:, columns].sum(axis=1)).ravel()


def ranking(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties keep corpus order (a stable sort)."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = FUSION_K) -> list[tuple[int, float]]:
    """(document, Σ_lists 1 / (k + rank)) best first, rank 1-based; a document absent from a list gets nothing
    from it. Example: rankings [[7, 3], [3, 9]] -> 3: 1/62 + 1/61, 7: 1/61, 9: 1/62 -> [(3, ...), (7, ...), (9, ...)];
    equal sums keep the order of first appearance."""
    fused: dict[int, float] = {}
    for ranked in rankings:
        for rank, doc in enumerate(ranked, start=1):
            fused[doc] = fused.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


@dataclass(frozen=True)
class Hit:
    passage: Passage
    index: int
    score: float


class Retriever:
    """BM25, dense and hybrid search over one collection. `encode` and `embeddings` (N, d) are needed for dense
    and hybrid search; `embeddings` default to `encode` of every passage."""

    def __init__(self, passages: Sequence[Passage], encode: Callable[[Sequence[str]], object] | None = None,
                 embeddings: np.ndarray | None = None, k1: float = 1.5, b: float = 0.75):
        if not passages:
            raise BadConfigError("a retriever needs at least one passage")
        self.passages = list(passages)
        self.bm25 = BM25([bm25_tokens(p.text) for p in self.passages], k1, b)
        self.encode = encode
        if embeddings is None and encode is not None:
            embeddings = _as_numpy(encode([p.text for p in self.passages]))
        self.embeddings = None if embeddings is None else _unit_rows(np.asarray(embeddings, dtype=np.float32))

    def scores(self, query: str, method: str) -> np.ndarray:
        if method == "bm25":
            return self.bm25.scores(bm25_tokens(query))
        if method == "dense":
            if self.embeddings is None or self.encode is None:
                raise BadConfigError("dense search needs an encoder (index with --encoder)")
            return self.embeddings @ _unit_rows(_as_numpy(self.encode([query])))[0]  # cosines, (N,)
        raise BadConfigError(f"method must be one of {METHODS}, got {method!r}")

    def search(self, query: str, k: int = 5, method: str = "hybrid") -> list[Hit]:
        if method == "hybrid":
            depth = min(FUSION_DEPTH, len(self.passages))
            fused = reciprocal_rank_fusion([ranking(self.scores(query, m), depth) for m in ("bm25", "dense")])[:k]
            return [Hit(self.passages[i], i, s) for i, s in fused]
        scores = self.scores(query, method)
        return [Hit(self.passages[i], i, float(scores[i])) for i in ranking(scores, k)]


def _as_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def recall_at_k(retrieved: Sequence[Sequence[str]], relevant: Sequence[str | set[str]], k: int) -> float:
    """Share of queries with a relevant passage id among their first k retrieved ids."""
    sets = [{r} if isinstance(r, str) else set(r) for r in relevant]
    return sum(bool(set(ids[:k]) & gold) for ids, gold in zip(retrieved, sets)) / max(len(sets), 1)


def mean_reciprocal_rank(retrieved: Sequence[Sequence[str]], relevant: Sequence[str]) -> float:
    """Mean of 1 / (rank of the relevant passage), 0 where it was not retrieved."""
    return sum(1 / (ids.index(gold) + 1) if gold in ids else 0.0
               for ids, gold in zip(retrieved, relevant)) / max(len(relevant), 1)


# ---------------------------------------------------------------------------------------------------------
# Prompt, answer, citations


def passage_block(passages: Sequence[Passage]) -> str:
    return "\n".join(f"[{n}] {p.text}" for n, p in enumerate(passages, start=1))


def build_prompt(tokenizer, question: str, passages: Sequence[Passage], max_prompt_tokens: int,
                 template: str = RAG_TEMPLATE) -> tuple[list[int], list[Passage]]:
    """Chat prompt ids with as many of `passages` (best first) as fit in max_prompt_tokens, and those passages.
    A first passage that alone is too long is cut word by word from its end, so the prompt always has one."""
    def render(chosen: Sequence[Passage]) -> list[int]:
        content = template.format(question=question, passages=passage_block(chosen))
        return tokenizer.render_prompt([{"role": "user", "content": content}])

    used: list[Passage] = []
    for p in passages:
        if len(render(used + [p])) > max_prompt_tokens:
            break
        used.append(p)
    if used or not passages:
        return render(used), used
    words = passages[0].text.split()
    while words and len(render([Passage(passages[0].id, " ".join(words))])) > max_prompt_tokens:
        words = words[:-max(1, len(words) // 8)]
    cut = Passage(passages[0].id, " ".join(words), passages[0].meta)
    ids = render([cut])
    if len(ids) > max_prompt_tokens:
        raise BadConfigError(f"the question alone takes {len(ids)} tokens, more than the {max_prompt_tokens} the "
                             "prompt may use")
    return ids, [cut]


def parse_citations(answer: str, n_passages: int) -> tuple[str, list[int]]:
    """(the answer without its [n] markers, the 1-based passage numbers cited, in order, each once); numbers
    outside 1..n_passages are dropped from the answer and not cited. "Velmora [2]." -> ("Velmora.", [2])."""
    cited = []
    for match in CITATION_RE.finditer(answer):
        n = int(match.group(1))
        if 1 <= n <= n_passages and n not in cited:
            cited.append(n)
    return CITATION_RE.sub("", answer).strip(), cited


def mentions(text: str, value: str) -> bool:
    """Whether the normalised value occurs in the normalised text as whole words."""
    value = normalize(value)
    return bool(value) and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", normalize(text)) is not None


def cite(answer: str, passages: Sequence[Passage]) -> dict:
    """{"answer", "citations": [{"n", "id", "text"}], "cited_by": "model" | "attached" | "none"}."""
    text, cited = parse_citations(answer, len(passages))
    cited_by = "model" if cited else "none"
    if not cited and text:
        cited = [n for n, p in enumerate(passages, start=1) if mentions(p.text, text)]
        cited_by = "attached" if cited else "none"
    return {"answer": text, "cited_by": cited_by,
            "citations": [{"n": n, "id": passages[n - 1].id, "text": passages[n - 1].text} for n in cited]}


def judge_answer(answer: str, truth: str, context: str, vocabulary: Sequence[str] = ()) -> str:
    """One of OUTCOMES for an answer (citations removed) to a question whose true value is `truth`.

    The claims are the values of `vocabulary` (every value the asked relation takes in the fact base) that the
    answer names; an answer that names none claims its whole normalised text. No claim (empty, or words such as
    "the passages do not say") -> abstained; claims == {truth} -> correct; a claim that is neither the truth
    nor in `context` (the retrieved passages; "" when closed-book) -> hallucinated; otherwise misread: wrong,
    but only with values the passages state. Example: truth "baker", passages about a smith and a baker:
    "baker" -> correct, "smith" -> misread, "miner" -> hallucinated, "baker or miner" -> hallucinated."""
    text = normalize(answer)
    claims = {normalize(v) for v in vocabulary if mentions(text, v)}
    # a value inside a longer one ("rice" in "rice cake") is not a claim of its own
    claims = {c for c in claims if not any(c != o and mentions(o, c) for o in claims)}
    if not claims:
        if not text or ABSTAIN_RE.search(text):
            return "abstained"
        claims = {text}
    if claims == {normalize(truth)}:
        return "correct"
    if any(c != normalize(truth) and not mentions(context, c) for c in claims):
        return "hallucinated"
    return "misread"


# ---------------------------------------------------------------------------------------------------------
# Files: documents in, an index directory out


def read_passages(path: str | Path) -> list[Passage]:
    """Passages of a JSONL file ({"text", "id"?, "title"?, "meta"?} a line) or of a text file (paragraphs)."""
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not UTF-8 text ({e.reason})") from None
    passages = []
    if path.suffix in (".jsonl", ".json"):
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadFileError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
                raise BadFileError(f"{path}:{n}: expected an object with a non-empty string \"text\"")
            title = record.get("title")
            text = f"{title}. {record['text']}" if isinstance(title, str) and title else record["text"]
            passages.append(Passage(str(record.get("id", f"{path.stem}:{n}")), " ".join(text.split()),
                                    record.get("meta") if isinstance(record.get("meta"), dict) else {}))
    else:
        paragraph, start = [], 0
        for n, line in enumerate(lines + [""], start=1):
            if line.strip():
                start = start or n
                paragraph.append(line.strip())
            elif paragraph:
                passages.append(Passage(f"{path.stem}:{start}", " ".join(paragraph)))
                paragraph, start = [], 0
    repeated = [i for i, count in Counter(p.id for p in passages).items() if count > 1]
    if repeated:
        raise BadFileError(f"{path}: passage id {repeated[0]!r} appears more than once")
    if not passages:
        raise BadFileError(f"{path}: no passages")
    return passages


def save_index(directory: str | Path, passages: Sequence[Passage], embeddings: np.ndarray | None,
               settings: dict) -> Path:
    """Write passages.jsonl, index.json (settings) and embeddings.npy into `directory`, replacing it whole; a
    directory that holds anything but an index is never replaced."""
    directory = Path(directory)
    if directory.exists() and not (directory / "index.json").is_file() and (
            not directory.is_dir() or any(directory.iterdir())):
        raise BadConfigError(f"--out {directory} exists and is not an index; choose a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": p.id, "text": p.text, "meta": p.meta}, ensure_ascii=False) + "\n"
                         for p in passages)
        if embeddings is not None:
            np.save(tmp / "embeddings.npy", np.asarray(embeddings, dtype=np.float32))
        (tmp / "index.json").write_text(json.dumps({**settings, "passages": len(passages)}, indent=2))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_index(directory: str | Path, encode: Callable | None = None) -> tuple[Retriever, dict]:
    """(retriever, settings) of an index directory; the encoder named in its settings is loaded unless given."""
    directory = Path(directory)
    settings_path = directory / "index.json"
    if not settings_path.is_file():
        raise BadFileError(f"{settings_path}: missing (not an index; make one with `lmforge rag index`)")
    try:
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{settings_path}: corrupt JSON at line {e.lineno}") from None
    passages = read_passages(directory / "passages.jsonl")
    embeddings = None
    if settings.get("encoder"):
        embeddings = np.load(directory / "embeddings.npy")
        if len(embeddings) != len(passages):
            raise BadFileError(f"{directory / 'embeddings.npy'}: {len(embeddings)} rows for {len(passages)} passages")
        if encode is None:
            from lmforge.evaluate.metrics import load_encoder

            encode = load_encoder(settings["encoder"])
    return Retriever(passages, encode, embeddings, settings.get("k1", 1.5), settings.get("b", 0.75)), settings


# ---------------------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class IndexConfig:
    docs: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DOCS")]
    """Passages: JSONL {"text", "id"?, "title"?, "meta"?} a line, or a text file of blank-line-separated paragraphs."""
    out: str = "runs/index"
    """Index directory to write (replaced whole if it exists)."""
    encoder: str = ""
    """Local model for dense search: a sentence-transformers directory or a causal LM checkpoint (mean-pooled
    hidden states). Empty: BM25 only."""
    k1: float = 1.5
    """BM25 term-frequency saturation: how fast repeats of a query word stop adding score."""
    b: float = 0.75
    """BM25 length normalisation: 0 ignores document length, 1 divides fully by |d| / avgdl."""


def run_index(cfg: IndexConfig) -> Path:
    passages = read_passages(cfg.docs)
    if cfg.k1 < 0 or not 0 <= cfg.b <= 1:
        raise BadConfigError(f"--k1 must be >= 0 and --b in [0, 1], got {cfg.k1} and {cfg.b}")
    embeddings = None
    if cfg.encoder:
        from tqdm import tqdm

        from lmforge.evaluate.metrics import load_encoder

        encode = load_encoder(cfg.encoder)
        chunks = [passages[i:i + 256] for i in range(0, len(passages), 256)]
        embeddings = np.concatenate([_as_numpy(encode([p.text for p in chunk]))
                                     for chunk in tqdm(chunks, desc="embedding passages", disable=None)])
    out = save_index(cfg.out, passages, embeddings, {"encoder": str(Path(cfg.encoder).resolve()) if cfg.encoder
                                                     else "", "k1": cfg.k1, "b": cfg.b, "docs": str(cfg.docs)})
    print(f"indexed {len(passages)} passages -> {out} ({'BM25 + dense' if cfg.encoder else 'BM25'})")
    return out


@dataclass(frozen=True)
class AskConfig:
    model: str = ""
    """Chat checkpoint that answers."""
    index: str = ""
    """Index directory from `lmforge rag index`."""
    question: str = ""
    """One question."""
    questions: str = ""
    """A file of questions instead: JSONL {"question"} a line, or one question a line."""
    method: str = "hybrid"
    """Retrieval: bm25, dense or hybrid (dense and hybrid need an index made with --encoder)."""
    k: int = 5
    """Passages retrieved (and printed)."""
    passages_in_prompt: int = 2
    """The top retrieved passages put in the prompt, fewer when the context is full (the embedded world's
    1M-parameter reader reads one reliably, not two: `lmforge experiment rag`)."""
    max_new_tokens: int = 32
    """Longest answer in tokens."""
    out: str = ""
    """JSONL file for the answers; default: printed only."""


def read_questions(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such file")
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadFileError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise BadFileError(f"{path}:{n}: expected an object with a string \"question\"")
            line = record["question"]
        questions.append(line.strip())
    if not questions:
        raise BadFileError(f"{path}: no questions")
    return questions


def answer_questions(model, tokenizer, questions: Sequence[str], hits: Sequence[Sequence[Hit]],
                     passages_in_prompt: int = 2, max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers with the top `passages_in_prompt` of each question's retrieved `hits` in the prompt:
    {question, answer, citations, cited_by, retrieved (ids, best first), in_prompt (ids)}."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=32)
    if max_new_tokens >= engine.max_len:
        raise BadConfigError(f"--max-new-tokens {max_new_tokens} leaves no room in the {engine.max_len}-token context")
    prompts = [build_prompt(tokenizer, q, [h.passage for h in found[:passages_in_prompt]],
                            engine.max_len - max_new_tokens) for q, found in zip(questions, hits)]
    outputs = engine.generate([ids for ids, _ in prompts], SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return [{"question": q, **cite(out.text.strip(), used), "retrieved": [h.passage.id for h in found],
             "in_prompt": [p.id for p in used]}
            for q, found, (_, used), out in zip(questions, hits, prompts, outputs)]


def run_ask(cfg: AskConfig) -> list[dict]:
    from lmforge.hf import load_model

    if not cfg.model or not cfg.index:
        raise BadConfigError("rag ask needs --model CHECKPOINT and --index DIR")
    if bool(cfg.question) == bool(cfg.questions):
        raise BadConfigError("give one of --question TEXT or --questions FILE")
    if cfg.method not in METHODS:
        raise BadConfigError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.k < 1 or cfg.passages_in_prompt < 1:
        raise BadConfigError("--k and --passages-in-prompt must be at least 1")
    retriever, settings = load_index(cfg.index)
    if cfg.method != "bm25" and retriever.embeddings is None:
        raise BadConfigError(f"{cfg.index}: indexed without --encoder, so only --method bm25 works")
    questions = [cfg.question] if cfg.question else read_questions(cfg.questions)
    model, tokenizer = load_model(cfg.model)
    hits = [retriever.search(q, max(cfg.k, cfg.passages_in_prompt), cfg.method) for q in questions]
    rows = answer_questions(model, tokenizer, questions, hits, cfg.passages_in_prompt, cfg.max_new_tokens)
    for row in rows:
        sources = " ".join(f"[{c['n']}] {c['id']}" for c in row["citations"]) or "(no passage cited)"
        print(f"Q: {row['question']}\nA: {row['answer']}\n   sources: {sources}")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cfg.out).with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(cfg.out)
    return rows
