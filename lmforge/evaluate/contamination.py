"""Benchmark contamination: does a test item share a 13-gram with the training data? (evaluation.md §11)

GPT-3 (App. C) calls a test item dirty when any of its N-grams occurs in the training data; lm-evaluation-harness
fixes N = 13. The recipe here:

- **words**: lowercase the text, delete punctuation and symbols (every character that is neither a letter, a
  digit nor whitespace, and "_"), split on whitespace. On ASCII text this is exactly lm-eval's janitor
  (`str.translate` deleting `string.punctuation`); deleting Unicode punctuation too makes curly quotes match
  straight ones ("Janet’s" and "Janet's" are both "janets"). "Don't STOP—now!" -> ["dont", "stopnow"];
- **n-grams**: every run of n consecutive words inside one document (never across two documents);
- **contaminated item**: one sharing at least one n-gram with the training data. An item of fewer than n words
  has no n-gram and is never flagged: the result counts them (`n_too_short`) so a short-item benchmark is not
  mistaken for a clean one;
- **report**: the contaminated share per task, the indices of the clean subset (report every metric on it next
  to the full-set number) and a few examples with the n-gram that matched.

Memory stays bounded for large corpora: an n-gram is stored as a 64-bit hash in a sorted numpy array (8 bytes per
distinct n-gram: ~3.5M n-grams for 20 MB of English text -> ~28 MB), built from documents streamed by
`read_documents`. The hash is a polynomial over stable per-word hashes (blake2b), computed with vectorised numpy
arithmetic mod 2^64; two different n-grams collide with probability ~2^-64, so even 10^7 training n-grams against
10^5 test n-grams give a false flag with probability ~10^-7.

    lmforge eval contamination --train runs/world/world/corpus/train.jsonl --benchmark gsm8k
    lmforge eval contamination --train ../shared/data/pretrain --benchmark runs/world/world/tasks/test.alpaca.jsonl \\
        --task-field meta.cluster
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from lmforge.data.corpus import read_documents
from lmforge.data.instructions import read_records as instruction_records
from lmforge.errors import BadConfigError, BadFileError, MismatchError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository

# name -> (file under the shared data folder, record fields that make up an item); see its SOURCES.md
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gsm8k": ("eval/gsm8k/test.jsonl", ("question", "answer")),
    "arc_challenge": ("eval/llm-adapters/ARC-Challenge/test.json", ("instruction",)),
    "arc_easy": ("eval/llm-adapters/ARC-Easy/test.json", ("instruction",)),
    "piqa": ("eval/llm-adapters/piqa/test.json", ("instruction",)),
    "winogrande": ("eval/llm-adapters/winogrande/test.json", ("instruction",)),
    "truthfulqa": ("eval/truthfulqa/TruthfulQA.csv", ("Question", "Best Answer")),
    "mt_bench": ("eval/mt_bench/question.jsonl", ("turns",)),
    "ifeval": ("eval/ifeval/input_data.jsonl", ("prompt",)),
    "alpaca_eval": ("eval/alpaca_eval/text_davinci_003/model_outputs.json", ("instruction",)),
    "humaneval": ("eval/humaneval/HumanEval.jsonl.gz", ("prompt", "canonical_solution")),
}

_NOT_A_WORD_CHAR = re.compile(r"[^\w\s]|_")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection mod 2^64
_CONSOLIDATE_EVERY = 1 << 22  # pending hashes (32 MiB) before they are merged into the sorted unique set


# --- n-grams and their hashes -------------------------------------------------------------------------------------

def normalize_words(text: str) -> list[str]:
    """Lowercased words with punctuation and symbols deleted (see the module docstring)."""
    return _NOT_A_WORD_CHAR.sub("", text.lower()).split()


@lru_cache(maxsize=1 << 18)  # at most ~50 MB of cached words
def _word_hash(word: str) -> int:
    # Stable across processes (Python's own str hash is salted per process).
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """uint64 hash of every n-gram of `words`, in order: h_i = Σ_j word_hash(words[i + j]) · M^(n-1-j) mod 2^64
    (Horner's rule, one vectorised multiply-add per position j). Empty when there are fewer than n words."""
    count = len(words) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter((_word_hash(x) for x in words), dtype=np.uint64, count=len(words))
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        h = h * _MULTIPLIER + w[j:j + count]  # uint64 arithmetic wraps around: mod 2^64
    return h


@dataclass(frozen=True)
class NgramIndex:
    """The distinct n-gram hashes of a training corpus, sorted (for binary search)."""

    n: int
    hashes: np.ndarray  # (K,) uint64, sorted, unique
    n_documents: int
    n_ngrams: int  # n-gram occurrences seen, repeats included (K counts each distinct one once)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `hashes` occur in the training data."""
        if len(self.hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.searchsorted(self.hashes, hashes).clip(max=len(self.hashes) - 1)
        return self.hashes[pos] == hashes


def build_ngram_index(texts: Iterable[str], n: int = 13, progress: bool = False) -> NgramIndex:
    """Hash every n-gram of every document in `texts` (streamed: e.g. `read_documents(path)`) into an index.
    Memory is 8 bytes per distinct n-gram plus at most `_CONSOLIDATE_EVERY` pending hashes."""
    if n < 1:
        raise BadConfigError(f"n must be a positive integer, got {n}")
    merged = np.zeros(0, dtype=np.uint64)
    pending: list[np.ndarray] = []
    n_pending = n_documents = n_ngrams = 0
    for text in tqdm(texts, desc="indexing training n-grams", unit="doc", disable=not progress):
        h = ngram_hashes(normalize_words(text), n)
        pending.append(h)
        n_pending += len(h)
        n_documents += 1
        n_ngrams += len(h)
        if n_pending >= _CONSOLIDATE_EVERY:
            merged, pending, n_pending = np.unique(np.concatenate([merged, *pending])), [], 0
    merged = np.unique(np.concatenate([merged, *pending]))
    return NgramIndex(n=n, hashes=merged, n_documents=n_documents, n_ngrams=n_ngrams)


# --- checking a benchmark ----------------------------------------------------------------------------------------

def contamination(items: list[str], index: NgramIndex, n: int = 13, max_examples: int = 5) -> dict:
    """Which items share an n-gram with the indexed training data:

        {"n_items", "contaminated" (count), "share" (contaminated / n_items), "n_too_short",
         "contaminated_ids", "clean_ids" (the clean subset, item indices), "examples": [{"index", "ngram", "text"}]}

    `ngram` is the first of the item's n-grams found in the training data (normalised words)."""
    if index.n != n:
        raise MismatchError(f"the index holds {index.n}-grams but {n}-grams were asked for")
    dirty, clean, examples, too_short = [], [], [], 0
    for i, item in enumerate(items):
        words = normalize_words(item)
        if len(words) < n:
            too_short += 1
        hits = np.flatnonzero(index.contains(ngram_hashes(words, n)))
        if len(hits) == 0:
            clean.append(i)
            continue
        dirty.append(i)
        if len(examples) < max_examples:
            first = int(hits[0])
            examples.append({"index": i, "ngram": " ".join(words[first:first + n]), "text": item[:300]})
    return {"n_items": len(items), "contaminated": len(dirty), "share": len(dirty) / len(items) if items else 0.0,
            "n_too_short": too_short, "contaminated_ids": dirty, "clean_ids": clean, "examples": examples}


# --- reading benchmark files --------------------------------------------------------------------------------------

def read_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl, .json (a list of records) or .csv file, optionally gzipped (`.jsonl.gz`)."""
    path = Path(path)
    kind = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if not path.is_file():
        raise BadFileError(f"{path}: no such file")
    if kind not in (".jsonl", ".json", ".csv"):
        raise BadFileError(f"{path}: a benchmark is a .jsonl, .json or .csv file (or a name: {', '.join(BENCHMARKS)})")
    return [record for _, record in instruction_records(path)]


def _field(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _strings(value) -> list[str]:
    """A field's text: a string, a list of strings, or chat messages (their contents)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value
                for s in (_strings(v["content"]) if isinstance(v, dict) and "content" in v else _strings(v))]
    return []


def item_text(record, fields: tuple[str, ...], where: str) -> str:
    """The text of one benchmark item: the named (dotted) fields joined by newlines, or by default every
    top-level string, list of strings and chat-message content of the record (e.g. GSM8K: question and answer;
    a world task: instruction, input and output)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise BadFileError(f"{where}: a record must be a JSON object")
    if not fields:
        return "\n".join(s for value in record.values() for s in _strings(value))
    parts = []
    for name in fields:
        value = _field(record, name)
        if value is None:
            raise BadFileError(f"{where}: no field {name!r}")
        parts += _strings(value)
    return "\n".join(parts)


def load_benchmark(name_or_path: str, fields: tuple[str, ...] = (),
                   data_dir: str | Path = SHARED_DATA) -> tuple[list[dict], tuple[str, ...]]:
    """(records, fields to use) for a benchmark named in `BENCHMARKS` (under data_dir) or a file path."""
    if name_or_path in BENCHMARKS:
        relative, default_fields = BENCHMARKS[name_or_path]
        path = Path(data_dir) / relative
        if not path.is_file():
            raise BadFileError(f"{path}: benchmark {name_or_path!r} is missing (is {data_dir} there?)")
        return read_records(path), fields or default_fields
    return read_records(name_or_path), fields


# --- the command --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContaminationConfig:
    train: tuple[str, ...]
    """Training data: files or directories (.txt, .jsonl {text}, ...), read as `read_documents` reads them."""
    benchmark: tuple[str, ...]
    """Benchmarks: a name (gsm8k, arc_challenge, arc_easy, piqa, winogrande, truthfulqa, mt_bench, ifeval,
    alpaca_eval, humaneval; files under --data-dir) or a .jsonl/.json/.csv file."""
    n: int = 13
    """n-gram length in words (lm-eval: 13)."""
    text_field: str = "text"
    """Field holding the text in training JSON lines / CSV."""
    fields: tuple[str, ...] = ()
    """Benchmark fields forming an item (dotted paths); default: a named benchmark's, else every string field."""
    task_field: str = ""
    """Dotted field that splits a benchmark into tasks reported separately, e.g. meta.cluster."""
    data_dir: str = str(SHARED_DATA)
    """Folder of the named benchmarks."""
    examples: int = 5
    """Contaminated examples shown per task."""
    out: str = ""
    """Also write the full results (with the clean subsets) as JSON here."""


def run(cfg: ContaminationConfig) -> dict:
    """Index the training n-grams once, check every benchmark (per task), print a table; return the results."""
    # --- training n-grams
    for path in cfg.train:
        if not Path(path).exists():
            raise BadFileError(f"{path}: no such file or directory")

    def documents():
        for path in cfg.train:
            yield from read_documents(path, cfg.text_field)

    index = build_ngram_index(documents(), cfg.n, progress=True)

    # --- benchmarks, split into tasks
    tasks: dict[str, dict] = {}
    for benchmark in cfg.benchmark:
        records, fields = load_benchmark(benchmark, cfg.fields, cfg.data_dir)
        name = benchmark if benchmark in BENCHMARKS else Path(benchmark).name
        groups: dict[str, list[str]] = {}
        for i, record in enumerate(records):
            value = _field(record, cfg.task_field) if cfg.task_field and isinstance(record, dict) else None
            task = name if value is None else f"{name}/{value}"  # a record without the field: the whole benchmark
            groups.setdefault(task, []).append(item_text(record, fields, f"{benchmark}: record {i}"))
        for task, items in groups.items():
            tasks[task] = contamination(items, index, cfg.n, cfg.examples)

    # --- report
    result = {"n": cfg.n, "train": list(cfg.train), "n_documents": index.n_documents,
              "n_train_ngrams": index.n_ngrams, "n_distinct_train_ngrams": len(index.hashes), "tasks": tasks}
    print(f"{index.n_documents} training documents, {len(index.hashes)} distinct {cfg.n}-grams")
    print(f"{'task':40s} {'items':>7s} {'dirty':>7s} {'share':>7s} {'short':>7s}")
    for task, r in tasks.items():
        print(f"{task:40s} {r['n_items']:7d} {r['contaminated']:7d} {r['share']:7.1%} {r['n_too_short']:7d}")
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cfg.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(cfg.out)
    return result
