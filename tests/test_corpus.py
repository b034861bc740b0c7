import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.corpus import Source, TokenCorpus, build_token_shards, mixture_weights, read_documents
from lmforge.errors import BadConfigError, BadFileError, MismatchError
from lmforge.tokenizer import train_tokenizer

SHARED = Path(__file__).parents[2] / "shared"

# GPT-3's training mix (the GPT-3 paper, Table 2.2); the percentages sum to 101.
GPT3_MIX = {"common_crawl": 60, "webtext2": 22, "books1": 8, "books2": 8, "wikipedia": 3}
# Disjoint alphabets, so every token (but BOS, EOS and the space) tells which source it came from.
ALPHABETS = ["abcde", "fghij", "klmno", "pqrst", "uvwxy"]


def make_docs(alphabet: str, n_docs: int, n_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choices(alphabet, k=rng.randint(2, 7))) for _ in range(n_words)) for _ in range(n_docs)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Five GPT-3-weighted sources of a few thousand tokens each, their tokenizer and the built corpus."""
    root = tmp_path_factory.mktemp("mixture")
    docs = {name: make_docs(alphabet, 20, 60, seed) for seed, (name, alphabet) in enumerate(zip(GPT3_MIX, ALPHABETS))}
    # A generator, not a list: train_tokenizer stats list items as possible file paths (too long here).
    tokenizer = train_tokenizer((d for ds in docs.values() for d in ds), 300)
    sources = [Source(str(write_jsonl(root / f"{name}.jsonl", docs[name])), weight) for name, weight in GPT3_MIX.items()]
    build_token_shards(sources, tokenizer, root / "corpus", seed=0)
    return tokenizer, docs, TokenCorpus.open(root / "corpus", tokenizer)


def source_of_rows(corpus: TokenCorpus, inputs: torch.Tensor) -> np.ndarray:
    """Which source each row came from, read off its tokens (tokens in several sources are ambiguous)."""
    owner = np.full(corpus.meta["vocab_size"], -1)
    seen = np.zeros(corpus.meta["vocab_size"], dtype=int)
    for k, tokens in enumerate(corpus.shards["train"]):
        ids = np.unique(tokens)
        owner[ids], seen[ids] = k, seen[ids] + 1
    owner[seen > 1] = -1
    rows = []
    for row in inputs.numpy():
        owners = set(owner[row].tolist()) - {-1}
        assert len(owners) == 1, "a window must lie inside one source"
        rows.append(owners.pop())
    return np.array(rows)


# --- mixtures ----------------------------------------------------------------------------------------------

def test_mixture_shares_match_gpt3_weights_within_one_point(mixture):
    _, _, corpus = mixture
    batch_size, seq_len, n_tokens = 64, 256, 10**6
    n_steps = -(-n_tokens // (batch_size * seq_len))
    batches = [corpus.train_batch(step, batch_size, seq_len, seed=0)[0] for step in range(n_steps)]
    rows = np.concatenate([source_of_rows(corpus, inputs) for inputs in batches])
    shares = np.bincount(rows, minlength=5) / len(rows)
    for k, (name, weight) in enumerate(GPT3_MIX.items()):
        assert abs(shares[k] - weight / 101) < 0.01, (name, shares[k], weight / 101)
    # mixture_shares reports the same counts without drawing the windows.
    reported = corpus.mixture_shares(n_steps * batch_size * seq_len, seq_len, seed=0)
    assert list(reported.values()) == pytest.approx(list(shares), abs=1e-12)


def test_weights_are_renormalised_and_checked(tmp_path):
    assert sum(mixture_weights([Source(f"{n}.txt", w) for n, w in GPT3_MIX.items()])) == pytest.approx(1.0)
    with pytest.raises(BadConfigError, match="books1"):
        Source("data/books1.txt", weight=-1)
    with pytest.raises(BadConfigError, match="all weights are zero"):
        mixture_weights([Source("a.txt", 0), Source("b.txt", 0)])
    with pytest.raises(BadConfigError, match="'a'"):
        mixture_weights([Source("x/a.txt"), Source("y/a.jsonl")])


# --- batches -----------------------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_and_step(mixture):
    _, _, corpus = mixture
    inputs, targets = corpus.train_batch(5, 8, 32, seed=1)
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == targets.dtype == torch.int64
    again = corpus.train_batch(5, 8, 32, seed=1)
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    assert not torch.equal(inputs, corpus.train_batch(6, 8, 32, seed=1)[0])
    assert not torch.equal(inputs, corpus.train_batch(5, 8, 32, seed=2)[0])
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    part_inputs, part_targets = corpus.train_batch(5, 8, 32, seed=1, rows=slice(2, 4))
    assert torch.equal(part_inputs, inputs[2:4]) and torch.equal(part_targets, targets[2:4])


def test_source_shorter_than_a_window_is_named(mixture):
    _, _, corpus = mixture
    shortest = min(range(5), key=lambda k: len(corpus.shards["train"][k]))
    with pytest.raises(BadConfigError, match=corpus.names[shortest]):
        corpus.train_batch(0, 2, len(corpus.shards["train"][shortest]), seed=0)


def test_valid_windows_are_consecutive_and_disjoint(mixture):
    _, _, corpus = mixture
    seq_len = 16
    windows = list(corpus.valid_windows(seq_len, batch_size=3))
    assert windows and all(x.shape[1] == seq_len and torch.equal(x[:, 1:], y[:, :-1]) for x, y in windows)
    first = corpus.shards["valid"][0]
    n_first = (len(first) - 1) // seq_len
    targets = torch.cat([y for _, y in windows]).flatten()[:n_first * seq_len]
    assert np.array_equal(targets.numpy(), first[1:n_first * seq_len + 1])
    assert sum(len(x) for x, _ in corpus.valid_windows(seq_len, max_windows=1)) == 5  # at most one per source


def test_mismatched_tokenizer_is_refused(mixture):
    other = train_tokenizer(["a completely different text about cats and dogs"] * 5, 300)
    with pytest.raises(MismatchError, match="corpus.json"):
        TokenCorpus.open(mixture[2].directory, other)


# --- shards ------------------------------------------------------------------------------------------------

def split_documents(tokens: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    docs, tokens = [], tokens.tolist()
    while tokens:
        end = tokens.index(eos)
        assert tokens[0] == bos, "every document starts with BOS"
        docs.append(tokens[1:end])
        tokens = tokens[end + 1:]
    return docs


def test_shards_hold_every_document_between_bos_and_eos(mixture):
    tokenizer, docs, corpus = mixture
    assert corpus.n_tokens("train") + corpus.n_tokens("valid") == sum(
        len(tokenizer.encode(d)) + 2 for ds in docs.values() for d in ds)
    k = corpus.names.index("books1")
    split = {s: split_documents(np.asarray(corpus.shards[s][k]), tokenizer.bos_id, tokenizer.eos_id) for s in ("train", "valid")}
    encoded = [tokenizer.encode(d) for d in docs["books1"]]
    assert len(split["valid"]) == 1  # 2% of 20 documents, but at least one
    assert sorted(split["train"] + split["valid"]) == sorted(encoded)  # disjoint by document, nothing lost
    assert corpus.meta["sources"][k]["train"]["documents"] == 19
    assert corpus.meta["dtype"] == "uint16" and corpus.meta["tokenizer"] == tokenizer.fingerprint()


def test_valid_sources_and_sniffed_json_lines(mixture, tmp_path):
    tokenizer = mixture[0]
    train, valid = ["abc abd", "bad cab", "ace bed"], ["dab dec", "cede"]
    # No extension: read as JSON lines because the first non-blank character is "{".
    train_path = write_jsonl(tmp_path / "petitions", train, field="content")
    valid_path = write_jsonl(tmp_path / "held_out.jsonl", valid, field="body")
    meta = build_token_shards(Source(str(train_path), text_field="content"), tokenizer, tmp_path / "c",
                              valid_sources=Source(str(valid_path), text_field="body"))
    assert meta["sources"][0]["train"]["documents"] == 3 and meta["sources"][0]["valid"]["documents"] == 2
    corpus = TokenCorpus.open(tmp_path / "c")
    got = split_documents(np.asarray(corpus.shards["valid"][0]), tokenizer.bos_id, tokenizer.eos_id)
    assert [tokenizer.decode(d) for d in got] == valid


def test_directory_is_read_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two\r\nlines", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", ["one", "one bis"])
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    assert list(read_documents(tmp_path)) == ["one", "one bis", "two\r\nlines"]


# --- bad input ---------------------------------------------------------------------------------------------

def assert_nothing_left(out_dir: Path):
    assert not out_dir.exists()
    assert not out_dir.parent.exists() or not any(out_dir.parent.iterdir()), "a temp dir was left behind"


def test_bad_inputs_are_named_and_leave_nothing(mixture, tmp_path):
    tokenizer = mixture[0]
    good = write_jsonl(tmp_path / "good.jsonl", ["abc abd", "bad cab"])
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    no_field = tmp_path / "no_field.jsonl"
    no_field.write_text('{"text": "fine"}\n{"content": "elsewhere"}\n', encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    cases = [
        (lambda: [Source(str(good)), Source(str(not_json))], BadFileError, f"{not_json}:3: not valid JSON"),
        (lambda: [Source(str(good)), Source(str(no_field))], BadFileError, f"{no_field}:2: no string field 'text'"),
        (lambda: [Source(str(empty))], BadFileError, f"{empty}: empty corpus"),
        (lambda: [Source(str(tmp_path / "missing.txt"))], BadFileError, f"{tmp_path / 'missing.txt'}: no such file"),
        (lambda: [Source(str(good), weight=-0.5)], BadConfigError, "'good'"),
    ]
    for i, (make_sources, error, message) in enumerate(cases):
        out_dir = tmp_path / f"built{i}" / "corpus"
        with pytest.raises(error) as raised:
            build_token_shards(make_sources(), tokenizer, out_dir)
        assert message in str(raised.value)
        assert_nothing_left(out_dir)


def test_interrupted_build_leaves_nothing(mixture, tmp_path, monkeypatch):
    tokenizer = mixture[0]
    sources = [Source(str(write_jsonl(tmp_path / f"s{i}.jsonl", ["abc abd", "bad cab"]))) for i in range(2)]
    calls = []

    def interrupt(texts):
        calls.append(texts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=False)]

    monkeypatch.setattr(tokenizer, "encode_batch", interrupt)
    out_dir = tmp_path / "built" / "corpus"
    with pytest.raises(KeyboardInterrupt):
        build_token_shards(sources, tokenizer, out_dir)
    assert_nothing_left(out_dir)


def test_datasets_directory_needs_the_package(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed")
    (tmp_path / "dataset_info.json").write_text("{}", encoding="utf-8")
    with pytest.raises(BadConfigError, match="pip install datasets"):
        next(read_documents(tmp_path))


# --- real data ---------------------------------------------------------------------------------------------

def test_korean_petitions_round_trip(mixture):
    path = SHARED / "data" / "pretrain" / "korean_petitions" / "petitions_2019-04"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    tokenizer = mixture[0]
    docs = list(itertools.islice(read_documents(path, text_field="content"), 200))
    assert len(docs) == 200
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc
