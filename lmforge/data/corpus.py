"""Token shards: text files -> flat token arrays on disk -> deterministic, resumable training batches.

A *shard* is one split of one source written as a flat array of token ids (numpy uint16, or uint32 for
vocabularies over 65,535 tokens) at `out_dir/<source>/{train,valid}.bin`. It is opened with `np.memmap`, so a
corpus larger than memory costs nothing to open. Every document is stored as `[bos] + ids + [eos]`:

    <|bos|> The cat sat . <|eos|> <|bos|> It rains . <|eos|> <|bos|> ...

so a window that crosses a boundary sees one text end (EOS) and the next begin (BOS), as chat rendering and
rolling perplexity present text. `out_dir/corpus.json` records sources, weights, counts and the tokenizer
fingerprint (a corpus is only meaningful with the tokenizer that wrote it).

Stateless batches: `train_batch(step, ...)` is a pure function of (seed, step, batch_size, seq_len); its random
numbers come from `np.random.default_rng([seed, step])`. Resuming at step k needs only k (no loader state in the
checkpoint), and under data parallelism every rank computes the same global batch and keeps its own rows
(`rows=slice(rank * b, (rank + 1) * b)`).

Low-discrepancy source choice: in a mixture, window i (i = step * batch_size + row) comes from the source whose
cumulative-weight interval holds u_i = frac(u_0 + i / golden_ratio), a Weyl sequence. Consecutive u_i fill
[0, 1) evenly, so after N windows each source's share is within a few / N of its weight. Independent draws
would be off by sqrt(w (1 - w) / N): at seq_len 2048, 10^6 tokens are ~490 windows, and a 22% source would miss
by ~1.9 percentage points (one standard deviation). The offset inside the chosen source stays random.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lmforge.errors import BadConfigError, BadFileError, MismatchError
from lmforge.tokenizer import Tokenizer

SPLITS = ("train", "valid")
DIRECTORY_SUFFIXES = (".txt", ".jsonl")  # what a directory contributes (plus extensionless JSON lines)
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by `save_to_disk`
CHUNK_DOCS = 1000  # documents per `encode_batch` call: big enough for the Rust threads, small in memory
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the Weyl step in 64-bit fixed point


# --- reading documents -------------------------------------------------------------------------------------

def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a file, a directory (its .txt/.jsonl files sorted by path, recursively), a local
    Hugging Face `datasets` directory, or a Hub name `owner/name` that is not a local path. A .txt file (or any
    file that is not .jsonl/.json/.csv and does not start with `{`) is one document; JSON lines and CSV give
    `record[text_field]` per record. Errors (a `BadFileError` naming file and line) come on iteration."""
    p = Path(path)
    if p.is_dir() and any((p / marker).is_file() for marker in HF_DATASET_MARKERS):
        yield from _read_hf_dataset(str(path), text_field, local=True)
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                 and (f.suffix.lower() in DIRECTORY_SUFFIXES or (f.suffix == "" and _starts_with_brace(f)))]
        for f in sorted(files, key=lambda f: f.relative_to(p).parts):
            yield from _read_file(f, text_field)
    elif p.is_file():
        yield from _read_file(p, text_field)
    elif _looks_like_hub_name(str(path)):
        yield from _read_hf_dataset(str(path), text_field, local=False)
    else:
        raise BadFileError(f"{path}: no such file")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    kind = path.suffix.lower()
    if kind not in (".txt", ".jsonl", ".json", ".csv") and _starts_with_brace(path):
        kind = ".jsonl"  # JSON lines without an extension, e.g. the Korean petitions dumps
    try:
        # utf-8-sig drops a byte-order mark; newline="" keeps "\r\n" inside a text document as written.
        with open(path, encoding="utf-8-sig", newline="") as f:
            if kind == ".jsonl":
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _text_of(_parse_json(line, path, lineno), text_field, f"{path}:{lineno}")
            elif kind == ".json":  # a list of records, e.g. Alpaca's JSON
                records = _parse_json(f.read(), path)
                for i, record in enumerate(records if isinstance(records, list) else [records]):
                    yield _text_of(record, text_field, f"{path}: record {i}")
            elif kind == ".csv":
                reader = csv.DictReader(f)
                for record in reader:
                    yield _text_of(record, text_field, f"{path}:{reader.line_num}")
            else:
                yield f.read()
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not UTF-8 text ({e.reason})") from None


def _parse_json(text: str, path: Path, lineno: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}:{lineno or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _text_of(record, text_field: str, where: str) -> str:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise BadFileError(f"{where}: no string field {text_field!r}")
    return text


def _starts_with_brace(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"{")


def _looks_like_hub_name(name: str) -> bool:
    # "roneneldan/TinyStories" yes; "data/corpus.txt" (known suffix) or "runs/x" (a local folder exists) no.
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
            and Path(name).suffix.lower() not in (".txt", ".jsonl", ".json", ".csv") and not Path(name).parent.exists())


def hf_train_split(name: str, local: bool):
    """The train split of a Hugging Face dataset: a local `save_to_disk` directory, or a Hub name."""
    try:
        import datasets  # optional: only users of Hugging Face datasets need it
    except ImportError:
        raise BadConfigError(f"{name}: reading a Hugging Face dataset needs the `datasets` package: "
                             "pip install datasets") from None
    ds = datasets.load_from_disk(name) if local else datasets.load_dataset(name, split="train")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise BadFileError(f"{name}: no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    return ds


def _read_hf_dataset(name: str, text_field: str, local: bool) -> Iterator[str]:
    ds = hf_train_split(name, local)
    if text_field not in ds.column_names:
        raise BadFileError(f"{name}: no column {text_field!r} (columns: {ds.column_names})")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=CHUNK_DOCS):
        for text in batch[text_field]:
            yield _text_of({text_field: text}, text_field, f"{name}: row {row}")
            row += 1


# --- sources and mixtures ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input of a mixture. Weights are relative token shares, renormalised to sum to 1, so GPT-3's mix
    (the GPT-3 paper, Table 2.2) can be written as published although its percentages sum to 101:

        [Source("common_crawl.jsonl", 60), Source("webtext2.jsonl", 22), Source("books1.txt", 8),
         Source("books2.txt", 8), Source("wikipedia.jsonl", 3)]   ->  0.594, 0.218, 0.079, 0.079, 0.030

    `name` (default: the file stem) names the shard folder and must be unique within a corpus."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "path", str(self.path))
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).stem or Path(self.path).resolve().name)
        if not self.name or self.name.startswith(".") or "/" in self.name or "\\" in self.name or self.name == "corpus.json":
            raise BadConfigError(f"source {self.path}: {self.name!r} cannot name a shard folder; pass name=")
        if not np.isfinite(self.weight) or self.weight < 0:
            raise BadConfigError(f"source {self.name!r} ({self.path}): weight must be a finite number >= 0, got {self.weight}")


def mixture_weights(sources: Sequence[Source]) -> list[float]:
    """The sources' weights renormalised to sum to 1."""
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise BadConfigError(f"source {name!r}: two sources share this name; pass name= to tell them apart")
    total = sum(s.weight for s in sources)
    if total <= 0:
        raise BadConfigError(f"sources {names}: all weights are zero")
    return [s.weight / total for s in sources]


# --- building shards ---------------------------------------------------------------------------------------

def build_token_shards(sources: Source | Sequence[Source], tokenizer: Tokenizer, out_dir: str | Path,
                       valid_fraction: float = 0.02, valid_sources: Source | Sequence[Source] | None = None,
                       seed: int = 0) -> dict:
    """Tokenize every source into `out_dir/<name>/{train,valid}.bin` and write `out_dir/corpus.json`; return
    its contents. The validation split is `valid_fraction` of each source's documents (at least one when it
    has two), chosen by a generator seeded from (seed, name); a source matched by a `valid_sources` entry
    (by name, or the single one of each) takes that file as its validation split instead. Atomic: built in a
    hidden folder beside `out_dir` and renamed into place (an old corpus there is replaced)."""
    sources = [sources] if isinstance(sources, Source) else list(sources)
    weights = mixture_weights(sources)
    valid_by_name = _match_valid_sources(sources, valid_sources)
    if not 0 <= valid_fraction < 1:
        raise BadConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "corpus.json").is_file():
        raise BadConfigError(f"{out_dir}: exists and is not a token corpus; choose another output folder")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    old = tmp.with_name(tmp.name + ".old")
    tmp.mkdir()
    try:
        entries = []
        for source, weight in zip(sources, weights):
            (tmp / source.name).mkdir()
            valid = valid_by_name.get(source.name)
            counts = _write_source(source, valid, tokenizer, tmp / source.name, dtype, valid_fraction, seed)
            entries.append({"name": source.name, "path": source.path, "text_field": source.text_field, "weight": weight,
                            "valid_path": valid.path if valid else None, **counts})
        meta = {"version": 1, "dtype": dtype.name, "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "seed": seed, "valid_fraction": valid_fraction,
                "sources": entries}
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rename(old)  # the old corpus goes only once the new one is complete
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise


def _match_valid_sources(sources: list[Source], valid_sources) -> dict[str, Source]:
    if valid_sources is None:
        return {}
    valid_sources = [valid_sources] if isinstance(valid_sources, Source) else list(valid_sources)
    if len(sources) == 1 and len(valid_sources) == 1:
        return {sources[0].name: valid_sources[0]}
    names = [s.name for s in sources]
    for v in valid_sources:
        if v.name not in names or [w.name for w in valid_sources].count(v.name) > 1:
            raise BadConfigError(f"validation source {v.name!r} ({v.path}) must match exactly one training source by name, "
                                 f"of {names}")
    return {v.name: v for v in valid_sources}


def _write_source(source: Source, valid: Source | None, tokenizer: Tokenizer, folder: Path, dtype: np.dtype,
                  valid_fraction: float, seed: int) -> dict:
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(folder / f"{split}.bin", "wb", buffering=1 << 20)) for split in SPLITS}

        def append(split: str, tokens: np.ndarray):
            files[split].write(tokens.tobytes())
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(tokens)

        if valid is None:
            # A first pass counts documents (and finds malformed lines before any tokenizing), so that exactly
            # round(fraction * n) of them, at least 1 of n >= 2 and never all, go to validation.
            n_docs = sum(1 for _ in read_documents(source.path, source.text_field))
            n_valid = min(max(round(valid_fraction * n_docs), int(valid_fraction > 0 and n_docs >= 2)), max(n_docs - 1, 0))
            is_valid = np.zeros(n_docs, dtype=bool)
            rng = np.random.default_rng([seed, zlib.crc32(source.name.encode())])
            is_valid[rng.choice(n_docs, size=n_valid, replace=False)] = True
            documents = read_documents(source.path, source.text_field)
            for index, tokens in _tokenize(documents, tokenizer, dtype, source.name, n_docs):
                append("valid" if is_valid[index] else "train", tokens)
        else:
            for _, tokens in _tokenize(read_documents(source.path, source.text_field), tokenizer, dtype, source.name):
                append("train", tokens)
            for _, tokens in _tokenize(read_documents(valid.path, valid.text_field), tokenizer, dtype, f"{source.name} (valid)"):
                append("valid", tokens)
    if counts["train"]["tokens"] == 0:
        raise BadFileError(f"{source.path}: empty corpus")
    if valid is not None and counts["valid"]["tokens"] == 0:
        raise BadFileError(f"{valid.path}: empty corpus")
    return counts


def _tokenize(docs: Iterator[str], tokenizer: Tokenizer, dtype: np.dtype, desc: str, total: int | None = None):
    """Yield (document index, [bos] + ids + [eos]) for every non-empty document, encoding CHUNK_DOCS at a time."""
    docs = iter(docs)
    with tqdm(total=total, desc=f"tokenizing {desc}", unit="doc", disable=None) as bar:
        for start in itertools.count(0, CHUNK_DOCS):
            texts = list(itertools.islice(docs, CHUNK_DOCS))
            if not texts:
                return
            for index, ids in enumerate(tokenizer.encode_batch(texts), start):
                if ids:  # an empty text has nothing to learn from
                    yield index, np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype)
            bar.update(len(texts))


# --- reading batches ---------------------------------------------------------------------------------------

class TokenCorpus:
    """A built corpus, memory-mapped: stateless training batches and deterministic validation windows."""

    def __init__(self, directory: Path, meta: dict, shards: dict[str, list[np.ndarray]]):
        self.directory, self.meta, self.shards = directory, meta, shards
        self.names = [s["name"] for s in meta["sources"]]
        self.weights = [s["weight"] for s in meta["sources"]]
        cumulative = np.cumsum(self.weights)
        self._boundaries = (cumulative / cumulative[-1])[:-1]  # source k owns u in [b[k-1], b[k])

    @classmethod
    def open(cls, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> "TokenCorpus":
        out_dir = Path(out_dir)
        meta_path = out_dir / "corpus.json"
        if not meta_path.is_file():
            raise BadFileError(f"{out_dir}: no corpus.json (build it with build_token_shards)")
        meta = _parse_json(meta_path.read_text(encoding="utf-8"), meta_path)
        if tokenizer is not None and tokenizer.fingerprint() != meta["tokenizer"]:
            raise MismatchError(f"{meta_path}: built with tokenizer {meta['tokenizer']}, but the given tokenizer is "
                                f"{tokenizer.fingerprint()}; rebuild the corpus with this tokenizer")
        dtype = np.dtype(meta["dtype"])
        shards = {split: [_open_shard(out_dir / s["name"] / f"{split}.bin", dtype, s[split]["tokens"]) for s in meta["sources"]]
                  for split in SPLITS}
        return cls(out_dir, meta, shards)

    def n_tokens(self, split: str = "train") -> int:
        return sum(len(tokens) for tokens in self.shards[split])

    def window_sources(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """The source index of each row of batch `step`: the low-discrepancy choice described at the top."""
        window_index = np.uint64(step * batch_size) + np.arange(batch_size, dtype=np.uint64)
        # Worked example: weights (0.6, 0.4) give boundaries [0.6]; from u_0 = 0.1 the sequence runs 0.1, 0.718,
        # 0.336, 0.954, 0.572, ... -> sources 0, 1, 0, 1, 0: 3 to 2 after five windows. The phase u_0 is a fixed
        # function of the seed, kept apart from the generator that draws the rows' offsets.
        phase = np.uint64(int.from_bytes(hashlib.sha256(f"lmforge mixture {seed}".encode()).digest()[:8], "little"))
        u = ((window_index * GOLDEN + phase) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # in [0, 1)
        return np.searchsorted(self._boundaries, u, side="right")

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                    rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 (batch_size, seq_len) or only `rows` of them: random windows of seq_len + 1
        tokens, targets = inputs shifted by one. A pure function of (seed, step, batch_size, seq_len)."""
        if step < 0 or batch_size < 1 or seq_len < 1:
            raise BadConfigError(f"need step >= 0, batch_size >= 1, seq_len >= 1; got {step}, {batch_size}, {seq_len}")
        for name, weight, tokens in zip(self.names, self.weights, self.shards["train"]):
            if weight > 0 and len(tokens) < seq_len + 1:
                raise BadConfigError(f"source {name!r}: {len(tokens)} training tokens, fewer than seq_len + 1 = {seq_len + 1}")
        sources = self.window_sources(step, batch_size, seed)  # (B,)
        n_starts = np.array([len(self.shards["train"][k]) - seq_len for k in sources])
        # Every row's offset is drawn even when only some rows are returned, so row r is the same in any slice.
        starts = np.random.default_rng([seed, step]).integers(0, n_starts)  # (B,)
        keep = np.arange(batch_size)[rows] if rows is not None else np.arange(batch_size)
        windows = np.stack([self.shards["train"][sources[r]][starts[r]:starts[r] + seq_len + 1] for r in keep]).astype(np.int64)
        windows = torch.from_numpy(windows)  # (b, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def valid_windows(self, seq_len: int, max_windows: int | None = None,
                      batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows over each source's validation split, in source order: window j
        of a source is tokens [j * seq_len, (j + 1) * seq_len + 1), so every validation token after the first is
        a target exactly once. At most `max_windows` per source (so every source of a mixture is measured),
        yielded as int64 (b, seq_len) pairs of up to `batch_size` windows, never mixing sources."""
        for tokens in self.shards["valid"]:
            n_windows = max(len(tokens) - 1, 0) // seq_len
            if max_windows is not None:
                n_windows = min(n_windows, max_windows)
            for first in range(0, n_windows, batch_size):
                last = min(first + batch_size, n_windows)
                windows = np.stack([tokens[j * seq_len:(j + 1) * seq_len + 1] for j in range(first, last)]).astype(np.int64)
                windows = torch.from_numpy(windows)  # (b, T + 1)
                yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def mixture_shares(self, n_tokens: int, seq_len: int, seed: int) -> dict[str, float]:
        """Each source's share of the tokens in the first ceil(n_tokens / seq_len) training windows (whatever the
        batch size: windows are numbered step * batch_size + row)."""
        n_windows = -(-n_tokens // seq_len)
        counts = np.bincount(self.window_sources(0, n_windows, seed), minlength=len(self.names))  # one big batch
        return {name: float(c) / n_windows for name, c in zip(self.names, counts)}


def _open_shard(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if not path.is_file():
        raise BadFileError(f"{path}: no such file; rebuild the corpus")
    if path.stat().st_size != n_tokens * dtype.itemsize:
        raise BadFileError(f"{path}: {path.stat().st_size} bytes, but corpus.json says {n_tokens} {dtype.name} tokens; "
                           "rebuild the corpus")
    # np.memmap cannot map an empty file (an empty validation split, say).
    return np.memmap(path, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype=dtype)
