"""13-gram contamination on hand-built corpora, and real benchmarks against the world corpus (when present)."""

import json

import numpy as np
import pytest

import lmforge.evaluate.contamination as contamination_module
from lmforge.data.world import export_world
from lmforge.errors import BadFileError, MismatchError
from lmforge.evaluate.contamination import (ContaminationConfig, build_ngram_index, contamination, ngram_hashes,
                                            normalize_words, run)

from conftest import SHARED

TRAIN = " ".join(f"w{i}" for i in range(40))  # 40 distinct words: w0 ... w39


def words(a: int, b: int) -> str:
    return " ".join(f"w{i}" for i in range(a, b))


def test_words_are_lowercased_with_punctuation_and_symbols_deleted():
    assert normalize_words("Don't STOP—now!  Janet’s $2 e-mail") == ["dont", "stopnow", "janets", "2", "email"]
    assert normalize_words("snake_case 고양이가, 생선을.") == ["snakecase", "고양이가", "생선을"]


def test_ngram_hashes_depend_only_on_the_words():
    a = ngram_hashes("x y z a b c".split(), 3)
    b = ngram_hashes("a b c q".split(), 3)
    assert len(a) == 4 and len(b) == 2 and a.dtype == np.uint64
    assert a[3] == b[0]  # "a b c" at two positions, in two texts
    assert len(set(a.tolist())) == 4
    assert len(ngram_hashes("a b".split(), 3)) == 0


def test_a_copied_item_is_flagged_whatever_its_case_and_punctuation():
    index = build_ngram_index(["unrelated text here", TRAIN], n=13)
    assert index.n_documents == 2 and len(index.hashes) == 40 - 13 + 1
    copied = "Q: " + words(5, 25).upper().replace(" W1", ", W1") + "?"  # "W5 W6 ..., W10 ... W24?"
    result = contamination([copied, "something else entirely"], index, n=13)
    assert result["contaminated"] == 1 and result["share"] == 0.5
    assert result["contaminated_ids"] == [0] and result["clean_ids"] == [1]
    assert result["examples"][0]["index"] == 0
    assert result["examples"][0]["ngram"] == words(5, 18)


def test_a_paraphrase_sharing_only_12_grams_is_clean():
    # 12 training words, one new word, the next 12 training words: every 13-word window holds the new word
    # or crosses it, so no 13-gram is shared; 12-grams are.
    paraphrase = words(0, 12) + " changed " + words(12, 24)
    assert contamination([paraphrase], build_ngram_index([TRAIN], n=13), n=13)["contaminated"] == 0
    assert contamination([paraphrase], build_ngram_index([TRAIN], n=12), n=12)["contaminated"] == 1


def test_ngrams_do_not_cross_training_documents():
    index = build_ngram_index([words(0, 7), words(7, 14)], n=13)  # 7 + 7 words: no 13-gram in either
    assert len(index.hashes) == 0
    assert contamination([words(0, 14)], index, n=13)["contaminated"] == 0


def test_short_items_are_never_flagged_but_counted():
    result = contamination([words(0, 12), words(0, 13)], build_ngram_index([TRAIN]), n=13)
    assert result["n_too_short"] == 1 and result["contaminated_ids"] == [1]


def test_consolidation_keeps_the_same_index(monkeypatch):
    docs = [words(i, i + 20) for i in range(0, 200, 3)] + [TRAIN] * 3
    whole = build_ngram_index(docs, n=5)
    monkeypatch.setattr(contamination_module, "_CONSOLIDATE_EVERY", 7)
    merged_often = build_ngram_index(docs, n=5)
    assert np.array_equal(whole.hashes, merged_often.hashes) and whole.n_ngrams == merged_often.n_ngrams
    assert np.all(whole.hashes[1:] > whole.hashes[:-1])  # sorted, no repeats


def test_index_and_query_must_use_the_same_n():
    with pytest.raises(MismatchError):
        contamination(["a"], build_ngram_index([TRAIN], n=13), n=8)


def test_run_reports_each_task_and_the_clean_subset(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text(TRAIN)
    (tmp_path / "train" / "b.jsonl").write_text(json.dumps({"text": "Some other document."}) + "\n")
    rows = [{"question": words(0, 20), "answer": "1", "meta": {"cluster": "copied"}},
            {"question": words(0, 12) + " new " + words(12, 24), "answer": "2", "meta": {"cluster": "copied"}},
            {"question": "an original question about nothing", "answer": "3", "meta": {"cluster": "fresh"}}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report" / "contamination.json"
    result = run(ContaminationConfig(train=(str(tmp_path / "train"),), benchmark=(str(tmp_path / "bench.jsonl"),),
                                     task_field="meta.cluster", out=str(out)))
    assert json.loads(out.read_text()) == result
    assert result["n_documents"] == 2
    copied, fresh = result["tasks"]["bench.jsonl/copied"], result["tasks"]["bench.jsonl/fresh"]
    assert (copied["n_items"], copied["contaminated"], copied["share"], copied["clean_ids"]) == (2, 1, 0.5, [1])
    assert (fresh["contaminated"], fresh["share"], fresh["n_too_short"]) == (0, 0.0, 1)


def test_missing_inputs_are_user_errors(tmp_path):
    with pytest.raises(BadFileError, match="no such file"):
        run(ContaminationConfig(train=(str(tmp_path / "absent"),), benchmark=("gsm8k",)))
    (tmp_path / "t.txt").write_text(TRAIN)
    with pytest.raises(BadFileError, match="gsm8k"):
        run(ContaminationConfig(train=(str(tmp_path / "t.txt"),), benchmark=("gsm8k",), data_dir=str(tmp_path)))
    (tmp_path / "bad.jsonl").write_text('{"question": "ok"}\n{broken\n')
    with pytest.raises(BadFileError, match="bad.jsonl:2"):
        run(ContaminationConfig(train=(str(tmp_path / "t.txt"),), benchmark=(str(tmp_path / "bad.jsonl"),)))


def test_real_benchmarks_are_clean_against_the_world_corpus(tmp_path):
    data = SHARED / "data"
    if not (data / "eval" / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("../shared/data is absent")
    export_world(tmp_path / "world", n_train_docs=1000, n_valid_docs=10, n_tasks_per_cluster=1,
                 n_eval_tasks_per_cluster=1)
    result = run(ContaminationConfig(train=(str(tmp_path / "world" / "corpus" / "train.jsonl"),),
                                     benchmark=("gsm8k", "truthfulqa"), data_dir=str(data)))
    gsm8k = result["tasks"]["gsm8k"]
    assert gsm8k["n_items"] == 1319 and gsm8k["n_too_short"] == 0
    assert gsm8k["share"] <= 0.01
    assert result["tasks"]["truthfulqa"]["share"] <= 0.01
    # and the check does fire on real text: GSM8K test questions inside the training data are found
    copied = [json.loads(line)["question"] for line in (data / "eval" / "gsm8k" / "test.jsonl").open()][:50]
    index = build_ngram_index(copied)
    assert contamination(copied[:50], index)["share"] == 1.0
